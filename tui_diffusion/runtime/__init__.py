"""The runtime: how jobs get from the app or the command line to a worker and back. Torch-free.

- ``queue``: job ids, the one vocabulary of job states, and the durable rows (the only writer of them);
- ``policy``: when a dead worker is replaced and when the runtime gives up (one policy for the app,
  ``run`` and ``serve``);
- ``protocol``: the ``Backend`` protocol every backend answers (``tui_diffusion.backends``, and the
  server's ``RemoteClient``) and the events they stream;
- ``supervisor``: the client API the app and the CLI call, putting the three together.
"""
