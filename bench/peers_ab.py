"""Two builds of this project side by side with the peers, in one run.

Runs `../shared/bench/peers.py` with two more contestants, `base-sqlite` and
`base-redis`: this project as installed in the venv `$STEM_BASE_VENV` (for example a
worktree of the commit before a change), next to `stem-sqlite`/`stem-redis` from
`$STEM_VENV`. Same workload, same moment, interleaved repetitions: the before/after
ratio of a hot-path change, and each build's ratio to the fastest peer.

    STEM_VENV=$PWD/.venv STEM_BASE_VENV=/path/to/base/.venv \\
        /tmp/peers-venv/bin/python bench/peers_ab.py \\
        --peers huey-redis,base-sqlite,stem-sqlite,base-redis,stem-redis --reps 2
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Beside the checkout by default; STEM_SHARED_BENCH for a checkout elsewhere (a worktree).
SHARED = Path(
    os.environ.get("STEM_SHARED_BENCH")
    or Path(__file__).resolve().parent.parent.parent / "shared" / "bench"
)
sys.path.insert(0, str(SHARED))

import peers  # noqa: E402  (the shared harness, found above)

BASE_BIN = Path(os.environ.get("STEM_BASE_VENV", "/nonexistent")) / "bin"


def base_argv(store: str) -> list[str]:
    return [str(BASE_BIN / "stem"), "worker", "run", "--app", f"stem_{store}_app:stem",
            "--concurrency", "2"]  # fmt: skip


def base_peer(store: str) -> peers.Peer:
    return peers.Peer(
        f"base-{store}", f"stem_{store}_app", "stem", store == "redis",
        lambda url: base_argv(store), "concurrency = CPU count", BASE_BIN / "python",
    )  # fmt: skip


if (BASE_BIN / "stem").exists():
    peers.PEERS += [base_peer("sqlite"), base_peer("redis")]

if __name__ == "__main__":
    peers.main()
