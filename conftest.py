"""Test-session setup shared by tests/ and the doctests in residkit/.

Runs before residkit is imported anywhere, so that:
- nothing can reach a model hub (HF_HUB_OFFLINE=1); zoo checkpoints and real models live in
  residkit's cache (``RESIDKIT_HOME``, else the user cache dir), so real models are fetched
  from the package index once, not once per run;
- every jaxtyping shape annotation in residkit is checked at run time by beartype.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from jaxtyping import install_import_hook

# Tiny test models do GEMMs of a few thousand FLOPs: thread hand-off costs more than it saves,
# and two threads contend badly on a shared 2-core machine.
torch.set_num_threads(1)

# Left installed for the whole session on purpose: residkit modules imported later are checked too.
# The fuzz suite (tests/fuzz_cases.py) turns it off, to meet residkit's own checks as a user does.
if os.environ.get("RESIDKIT_TYPECHECK", "1") != "0":
    install_import_hook("residkit", "beartype.beartype")
