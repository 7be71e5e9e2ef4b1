"""``python -m model.enhance IN.wav OUT.wav --checkpoint CKPT [--preset NAME] [--resample] [--device cpu|cuda]``

Run it; do not import it: the code lives in model/inference.py, and ``model.enhance`` is the function.
"""

import sys

if __name__ == "__main__":
    from model.inference import main

    sys.exit(main())
