"""Model families, one package each, behind `registry` (the only place that branches on a family).

A family package (mixtral/, switch/) holds the same modules: config, layout
(parameter shapes and checkpoint parts), model (the Flax modules and the jitted
functions of the serving path), hf_keys and convert (Hugging Face -> parts),
engine (the serving engine's hooks), api (the public model object), and an
`__init__` exporting FAMILY, the family's entry in the registry.
"""
