"""sdviz web app: `python app.py` serves the explorer (see README). Layout and handlers live in sdviz.ui."""

from sdviz.ui import main

if __name__ == "__main__":
    main()
