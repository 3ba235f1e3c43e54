"""Data: the built-in procedural set, Fashion-MNIST, TFDS builders/sources, preprocessing and the grain pipeline.

- `builtin.BuiltinShapes`: "builtin_shapes", coloured shapes on textured stuff with semantic and instance masks.
- `fashion_mnist.load(split, ...)`: Fashion-MNIST from TFDS when possible, else the local IDX files.
- `tfds_builders`: array_record TFDS builders `maskjax_shapes` and `maskjax_fashion_mnist` (no TensorFlow needed).
- `pipeline.make_source(name, split, ...)`, `pipeline.TrainLoader`, `pipeline.eval_batches`: what the trainer uses.
- `preprocess`: resize, random crop + flip, normalisation to [-1, 1].

Examples are dicts of numpy arrays: 'image' uint8 [H, W, C], 'label' int32 [] (+ 'semantic', 'instance' [H, W]).
"""
