"""An analyst on another machine: queries the lake in a loop until told to stop, counting errors.

Run as ``python -m tests.distributed.analyst STOP_FILE REPORT_FILE`` with only the catalog's conninfo
(a read-only Postgres role) and the bucket's REDOX_S3_* variables in the environment. Writes a JSON
report: queries run, errors (type and message), and the row counts it saw, in order.
"""

import json
import sys
import time
from pathlib import Path

from resources import configured_warehouse

TABLES = ("patients", "encounters", "results", "appointments")


def main(stop: Path, report: Path) -> None:
    warehouse = configured_warehouse()
    queries, errors, seen = 0, [], []
    while not stop.exists():
        try:
            counts = warehouse.query(
                " UNION ALL ".join(f"SELECT '{t}' AS t, count(*) AS n FROM {t}" for t in TABLES)
            )
            seen.append(dict(zip(counts["t"].to_list(), counts["n"].to_list(), strict=True)))
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
        queries += 1
        time.sleep(0.5)
    report.write_text(json.dumps({"queries": queries, "errors": errors, "seen": seen}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
