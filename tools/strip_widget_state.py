"""Remove ipywidgets state from notebooks: ``python tools/strip_widget_state.py NB.ipynb ...``.

A live panel's state (``metadata.widgets``) belongs to the session that drew it; stored in the file
it would only go stale. The panels' outputs stay (their text form; nbval ignores them).
"""

import sys

import nbformat

for path in sys.argv[1:]:
    nb = nbformat.read(path, as_version=4)
    if nb.metadata.pop("widgets", None) is not None:
        nbformat.write(nb, path)
