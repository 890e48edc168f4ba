"""Models: offline assets, the typed model config, loading with identity, architecture adapters.

Loading, step by step: ``config`` → ``devices`` → ``source`` → ``shape`` → ``weights`` →
``load`` (a ``LoadedModel``, see ``identity``); ``adapters`` say where each architecture keeps
its blocks, final norm and unembedding; ``assets`` prepare the packaged offline copies.
"""
