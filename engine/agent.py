"""``python -m tug.engine.agent``: the destination agent's stable entry point.

The source starts the agent over SSH with this module name, so it stays put
whatever the layout; the agent itself lives in :mod:`tug.engine.destination`.
"""

from tug.engine.destination.agent import main

if __name__ == "__main__":
    main()
