"""`python -m domadapt ...` (also the entry used by `torchrun -m domadapt`)."""

from cli.main import main

if __name__ == "__main__":
    main()
