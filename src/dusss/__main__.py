"""`python -m dusss` entry point (also what `torchrun -m dusss` runs)."""

from dusss.cli import main

if __name__ == "__main__":
    main()
