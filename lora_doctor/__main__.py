from .cli import run

# Tensor-parallel workers are spawned and re-import the main module: run only in the parent.
if __name__ == "__main__":
    run()
