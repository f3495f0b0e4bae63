"""Test-only entry: ``accelerate launch tests/host_read_entry.py OUT_DIR --cfg EXP --opts ...`` runs
``linnaeus.train``'s main with every host read counted (``host_reads.watch``) and writes, per rank,
``OUT_DIR/rank<R>.json``: one row per optimizer step with the reads charged to it (those made since the previous
step's ``after_step`` returned) and whether the step was a boundary (it logged, validated, checkpointed or
unfroze). tests/integration/test_host_reads_launch.py reads them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from host_reads import watch  # run as a script: tests/ is sys.path[0]


def main() -> int:
    out, argv = Path(sys.argv[1]), sys.argv[2:]
    import linnaeus.train
    from linnaeus.engine.trainer import Trainer

    found: list[str] = []
    rows: list[dict] = []
    after_step = Trainer.after_step

    def counted_after_step(self) -> bool:
        step = self.step
        boundary = any(c.due(step) for c in (self.meter, self.validator, self.checkpointer, self.freeze))
        stop = after_step(self)
        rows.append({"step": step, "boundary": boundary, "reads": list(found)})
        found.clear()
        return stop

    Trainer.after_step = counted_after_step  # type: ignore[method-assign]
    undo = watch(found.append)
    try:
        code = linnaeus.train.main(argv)
    finally:
        undo()
        out.mkdir(parents=True, exist_ok=True)
        rank = int(os.environ.get("RANK", "0"))
        (out / f"rank{rank}.json").write_text(json.dumps({"rows": rows, "after_last_step": found}))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
