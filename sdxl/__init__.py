"""The model side of the predictor: LoRA merging, prompt encoding, CUDA graphs and step caching, ControlNet and its
preprocessors, IP-Adapter references, textual-inversion embeddings, user VAEs and the face/hand detailer.

predict.py (the Cog surface), weights.py (fetching, verifying and caching every weights file) and utils.py (model
loading, sampling, images, metadata) stay at the top level; README.md's architecture section says which module
here owns what.
"""
