"""`python -m benchmarks NAME [options]`: run one stage benchmark (or `all`) and write its JSON.

Each benchmark lives in benchmarks/NAME.py with `main(argv) -> dict` and compares against the strongest
baseline measured on the same machine in the same run.
"""
import importlib
import sys

from benchmarks.all import STAGES


# Benchmarks that `all` does not run: gpu needs a GPU node (and data prepared on CPU beforehand).
ON_THEIR_OWN = ["gpu"]


def available() -> list[str]:
    """The stage benchmarks, `all` and gpu (not every module here is one: common.py, corpus.py and the
    gpu check's helpers are not)."""
    return sorted(STAGES + ON_THEIR_OWN + ["all"])


def main(argv: list[str]) -> int:
    names = available()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("benchmarks:", ", ".join(names))
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"python -m benchmarks: error: unknown benchmark {name!r}; available: {', '.join(names)}",
              file=sys.stderr)
        return 2
    importlib.import_module(f"benchmarks.{name}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
