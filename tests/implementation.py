"""The one place the tests take the implementation under test from: minitrain, or a learner's file.

What: `under_test("minitrain.clip", "clip_grad_norm", "grad_norm")` returns those names. By
default (`make test`) they are minitrain's own, exactly as `from minitrain.clip import ...` gives
them. When the environment variable MINITRAIN_EXERCISE names exercises (`clip`, or
`clip,schedule`), the names that those exercises ask a learner to write come from the learner's
file `<workspace>/<exercise>.py` instead (workspace: MINITRAIN_WORKSPACE, default
`<repo>/exercises`); every other name still comes from minitrain. `make check NAME=clip` sets
both variables (tests/exercises.py).

Why one place: the same property tests that prove minitrain equal to the PyTorch built-ins then
grade a learner's code, without a second copy of any test. The built-in references are imported
in the test files under their own names (`torch_clip_grad_norm_`, `torch_sdpa`, ...), never through
here, so a learner's code can never be compared with itself.

Adopting it in a test file is one line: `from minitrain.clip import clip_grad_norm, grad_norm`
becomes `clip_grad_norm, grad_norm = under_test("minitrain.clip", "clip_grad_norm", "grad_norm")`.

Common bug: importing a name under test directly from minitrain somewhere else in the test file
(a helper, a fixture): that test then checks minitrain, not the learner, and passes for free.
"""
import importlib
import importlib.util
import os
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV_EXERCISE = "MINITRAIN_EXERCISE"
ENV_WORKSPACE = "MINITRAIN_WORKSPACE"


def _registry():
    """tests/exercises.py, loaded by path (it imports nothing heavy)."""
    name = "minitrain_exercise_registry"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name("exercises.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def selected_exercises():
    """The exercise names in MINITRAIN_EXERCISE (empty: test minitrain itself)."""
    return [n.strip() for n in os.environ.get(ENV_EXERCISE, "").split(",") if n.strip()]


def workspace():
    return pathlib.Path(os.environ.get(ENV_WORKSPACE) or REPO / "exercises")


def load_learner_file(exercise):
    """Import <workspace>/<exercise>.py as module `exercises_workspace.<exercise>` (cached)."""
    name = f"exercises_workspace.{exercise}"
    if name in sys.modules:
        return sys.modules[name]
    path = workspace() / f"{exercise}.py"
    if not path.exists():
        raise ValueError(f"{ENV_EXERCISE} selects exercise {exercise!r} but {path} does not exist: "
                         f"run `make exercise NAME={exercise}` first")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                       # before exec: dataclasses / pickling need it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _missing(exercise, name):
    """Stands in for a name the learner's file lacks: calling it says what to write."""
    def missing(*args, **kwargs):
        raise NotImplementedError(f"exercise {exercise}: write {name} (it is missing from "
                                  f"{workspace() / (exercise + '.py')})")
    missing.__name__ = name
    return missing


def under_test(module, *names):
    """The objects `names` of `module` to test: minitrain's, or the selected learner's file's.

    One name returns the object, several return a tuple (like operator.itemgetter)."""
    if not names:
        raise ValueError("under_test needs at least one name, e.g. under_test('minitrain.clip', 'grad_norm')")
    owners = {}                                      # name -> exercise that asks the learner for it
    selected = selected_exercises()
    if selected:
        known = {e.name: e for e in _registry().EXERCISES}
        unknown = [n for n in selected if n not in known]
        if unknown:
            raise ValueError(f"{ENV_EXERCISE}={','.join(selected)}: unknown exercise(s) {unknown}; "
                             f"known: {', '.join(known)}")
        for exercise in (known[n] for n in selected):
            if exercise.module == module:
                owners.update({n: exercise.name for n in exercise.names if n in names})
    out = []
    for name in names:
        if name in owners:
            learner = load_learner_file(owners[name])
            out.append(getattr(learner, name, None) or _missing(owners[name], name))
        else:
            out.append(getattr(importlib.import_module(module), name))
    return out[0] if len(out) == 1 else tuple(out)
