"""``python -m serving``: the slimserve command line."""

from serving.cli import app

if __name__ == "__main__":
    app(prog_name="slimserve")
