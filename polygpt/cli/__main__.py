"""`python -m polygpt.cli`: the CLI (as `python -m polygpt`)."""

from polygpt.cli import main

if __name__ == "__main__":
    main()
