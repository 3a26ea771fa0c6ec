"""The pack imports the way ComfyUI imports it: a folder of any name, relative imports only."""
import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pack_imports_under_a_folder_name_with_a_dash():
    name = "ComfyUI-STIV-test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        assert set(module.NODE_DISPLAY_NAME_MAPPINGS) <= set(module.NODE_CLASS_MAPPINGS)
        assert (ROOT / module.WEB_DIRECTORY).resolve() == (ROOT / "js").resolve()
        # the library also works as a subpackage of the pack
        pipeline = importlib.import_module(f"{name}.stiv_core.pipeline")
        assert pipeline.generate.__module__ == f"{name}.stiv_core.pipeline"
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]


def test_stiv_core_never_imports_comfyui_and_uses_relative_imports():
    bad = re.compile(r"^\s*(import|from)\s+(comfy|folder_paths|server|stiv_core)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "stiv_core").rglob("*.py")
                 if bad.search(p.read_text()) and p.name != "train.py"]
    assert offenders == []
