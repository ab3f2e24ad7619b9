"""Test-session setup shared by tests/ and the doctests in residkit/.

Runs before residkit is imported anywhere, so that:
- nothing can reach a model hub (HF_HUB_OFFLINE=1), and built checkpoints go to a temp cache;
- every jaxtyping shape annotation in residkit is checked at run time by beartype.
"""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("RESIDKIT_CACHE", tempfile.mkdtemp(prefix="residkit-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jaxtyping import install_import_hook

# Left installed for the whole session on purpose: residkit modules imported later are checked too.
install_import_hook("residkit", "beartype.beartype")
