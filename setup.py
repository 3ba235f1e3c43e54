"""maskjax: masked transformers for vision in JAX/Flax."""
import setuptools

_CORE = [
    "jax>=0.10.0",
    "flax>=0.12.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.12.0",
    "ml-collections>=1.0.0",
    "chex>=0.1.90",
    "numpy>=2.0",
    "grain>=0.2.12",
    "tensorflow-datasets>=4.9.8",  # TFDS builders with array_record run without TensorFlow.
    "array-record>=0.8.0",
    "tensorboardX>=2.6.2",
    "tqdm>=4.66",
    "Pillow>=10.0",
    "matplotlib>=3.8",
    "flatbuffers>=24.3",  # jax.export serialization.
    "importlib_resources>=6.0",  # tfds 4.9.10 needs it to build builders that live in an installed package.
]

setuptools.setup(
    name="maskjax",
    version="0.1.0",
    description="Masked transformers for vision: attention masks, MAE, MaskGIT, segmentation, in JAX/Flax.",
    packages=setuptools.find_packages(include=["maskjax", "maskjax.*"]),
    python_requires=">=3.11",
    install_requires=_CORE,
    extras_require={
        # transformers/safetensors/huggingface_hub/pyyaml: checkpoint-conversion tests (tests/convert), the latter two
        # also timm's dependencies. torch (CPU), timm and torchvision are installed by the Makefile (see there why).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5", "scipy>=1.11", "nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29",
                 "transformers>=5.0", "safetensors>=0.4", "huggingface_hub>=0.20", "pyyaml>=6.0",
                 # The official MaskGIT code (no dependencies of its own): the reference of tests/convert.
                 "maskgit>=0.0.1.dev0",
                 # Mask AP (maskjax.evaluate.segmentation.mask_ap) and its test.
                 "pycocotools>=2.0.7"],
        # pytorch-fid (the reference of tests/evaluate/test_inception.py) goes in with --no-deps from the Makefile,
        # like torchvision, which it needs.
        # TensorFlow is only needed for TFDS datasets whose builders require it (e.g. `fashion_mnist` download).
        "tfds": ["tensorflow-cpu>=2.16"],
        "notebooks": ["nbclient>=0.10", "nbformat>=5.10", "ipykernel>=6.29"],
        # COCO mask AP of instance predictions (maskjax.evaluate.segmentation.mask_ap).
        "coco": ["pycocotools>=2.0.7"],
    },
    entry_points={"console_scripts": ["maskjax=maskjax.main:run"]},
)
