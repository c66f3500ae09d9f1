"""fastdiff inside other libraries' models, one submodule per library, each imported on its own.

``fastdiff.integrations.diffusers``: ``apply_fastdiff(unet)`` / ``remove_fastdiff(unet)`` for diffusers'
UNets (needs ``pip install 'fastdiff[diffusers]'``). Importing this package imports no library.
"""
