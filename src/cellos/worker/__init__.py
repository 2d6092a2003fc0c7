"""The JetStream work queue of cells and the worker that runs them (DESIGN.md §1, L7).

``cellos submit FILE`` validates a document and puts it on stream ``CELLOS_CELLS``;
``cellos worker`` pulls documents from it and runs each through one warm ``Supervisor``.
"""
