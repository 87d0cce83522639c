"""Serving a trained adapter: find and load it (:mod:`~fedpeft.serve.saved`), export it alone or
merged into its base model (:mod:`~fedpeft.serve.export`, ``fedpeft export``), and chat with it in
the terminal (:mod:`~fedpeft.serve.chat`, ``fedpeft chat``).
"""
