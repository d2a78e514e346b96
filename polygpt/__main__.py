"""`python -m polygpt`: the CLI, for launchers that start modules (torchrun -m, mlx.launch)."""

from polygpt.cli import main

if __name__ == "__main__":
    main()
