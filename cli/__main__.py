"""`python -m cli ...` from the repository, `python -m domadapt_cli ...` where installed (also
the entry for `torchrun -m ...`)."""

from .main import main

if __name__ == "__main__":
    main()
