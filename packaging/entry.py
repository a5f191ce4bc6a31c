"""PyInstaller entry point: the one-file ``marathon`` executable runs every role."""

from marathon.cli import main

if __name__ == "__main__":
    main()
