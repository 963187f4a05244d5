"""Import a lesson script as a module (lessons are scripts, not a package), for tests of the
measuring helpers the lessons define."""
import importlib.util
import pathlib

LESSONS = pathlib.Path(__file__).resolve().parents[1] / "lessons"


def load_lesson(filename):
    """The module `lessons/<filename>`, executed once (its main() does not run)."""
    spec = importlib.util.spec_from_file_location(filename[:-3], LESSONS / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
