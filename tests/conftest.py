"""Configure ultralytics (offline, Pillow's own ``Image.open``, torch threads) before any test module imports it:
a module that imports ultralytics before ``model`` would otherwise leave its import-time changes in place for the
whole test process (``model.offline``)."""

import model  # noqa: F401
