"""The seed recipe's edits to ultralytics, applied in this process instead of in the installed files.

The recipe puts the seed's AKConv at ``ultralytics/nn/Extramodule/AKConv.py``, imports it in
``ultralytics/nn/tasks.py`` and adds it to ``parse_model``'s ``base_modules`` (built like ``Conv``: c1 prepended,
c2 scaled by the width multiple). :func:`register_recipe_akconv` has the same effect at run time, so that a recipe
checkpoint unpickles (its model refers to ``ultralytics.nn.Extramodule.AKConv.AKConv``) and a recipe config builds:

- the seed's module, loaded from ``/work/shared/seed/akconv_seed.py`` (what the recipe's user runs; the project
  never imports or copies it), is registered in ``sys.modules`` under the recipe's module path;
- ``AKConv`` is put in ``ultralytics.nn.tasks``' globals, where ``parse_model`` looks module names up;
- ``parse_model`` is recompiled from its own source with ``AKConv`` added next to ``Conv`` in ``base_modules`` —
  the recipe's one-line edit. ``base_modules`` is a local of that function, so nothing short of this reaches it.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
from pathlib import Path

SEED_FILE = Path(__file__).resolve().parents[3] / "shared" / "seed" / "akconv_seed.py"
RECIPE_PACKAGE = "ultralytics.nn.Extramodule"
RECIPE_MODULE = f"{RECIPE_PACKAGE}.AKConv"
BASE_MODULES_CONV_LINE = "            Conv,\n"  # the line of parse_model's base_modules the recipe adds AKConv after


def register_recipe_akconv() -> type:
    """Make the recipe's AKConv loadable and buildable by ultralytics in this process; returns the class.

    Idempotent. Fails with a message naming what is missing when the seed file is absent or ``parse_model`` no
    longer has the line the recipe edits (another ultralytics version).
    """
    if RECIPE_MODULE in sys.modules:
        return sys.modules[RECIPE_MODULE].AKConv
    if not SEED_FILE.exists():
        raise FileNotFoundError(f"the recipe peer runs the seed's AKConv: {SEED_FILE} not found")
    from ultralytics.nn import tasks

    source = inspect.getsource(tasks.parse_model)
    if source.count(BASE_MODULES_CONV_LINE) != 1:
        raise RuntimeError(
            "ultralytics.nn.tasks.parse_model has no single 'Conv,' line in base_modules to add AKConv after; "
            "this recipe registration was written for ultralytics 8.4.190"
        )
    package = sys.modules.setdefault(RECIPE_PACKAGE, types.ModuleType(RECIPE_PACKAGE))
    spec = importlib.util.spec_from_file_location(RECIPE_MODULE, SEED_FILE)
    seed = importlib.util.module_from_spec(spec)
    sys.modules[RECIPE_MODULE] = seed  # before running it: pickle and the class's __module__ resolve through here
    spec.loader.exec_module(seed)
    package.AKConv = seed
    tasks.AKConv = seed.AKConv
    patched = source.replace(BASE_MODULES_CONV_LINE, BASE_MODULES_CONV_LINE + "            AKConv,\n")
    exec(compile(patched, inspect.getsourcefile(tasks.parse_model), "exec"), tasks.__dict__)
    return seed.AKConv
