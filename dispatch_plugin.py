"""Dispatch plugin (skeleton; being written)."""
import sys


def main(argv=None):
    print("dispatch plugin: not yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
