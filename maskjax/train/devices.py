"""Accelerator kinds: peak bf16 FLOP/s, HBM, memory bandwidth and interconnect bandwidth per device.

Used by the planner (`python -m maskjax.plan`) to turn a compiled step into a predicted step time, MFU and an
HBM fit, and meant for MFU logging in the trainer (`detect_device_kind(jax.devices()[0])`).

Every number is the vendor's public figure per device (chip or GPU), with its source in a comment. Units: FLOP/s,
bytes, bytes/s. Conventions:
- `peak_flops`: dense (no structured sparsity) bf16 matrix throughput. NVIDIA quotes sparse figures first; the dense
  ones are half of those.
- `hbm_bytes`: Google quotes TPU HBM in GiB (2**30), NVIDIA in GB (1e9); both are taken as quoted. What a program
  can use is a little less (runtime reservations; JAX on GPU preallocates 75 % unless
  XLA_PYTHON_CLIENT_MEM_FRACTION / XLA_PYTHON_CLIENT_PREALLOCATE say otherwise).
- `interconnect_bandwidth`: the vendor's per-device figure for the fast interconnect (TPU ICI, GPU NVLink), both
  directions added, as quoted.
- `collective_bandwidth`: what the planner divides a collective's per-device bytes by: the bytes/s one device can
  send in a ring collective over one mesh axis inside the fast domain. TPU: a ring along one torus axis uses the 2
  links to that axis' neighbours, each sending one way, so 2 x (one-way link bandwidth) = interconnect / links.
  GPU (NVSwitch, all-to-all): one direction of NVLink = interconnect / 2 (NCCL's ring bus bandwidth approaches it).
  Collectives over several torus axes at once can use more links: this is the conservative single-axis figure.
- `domain_size`: most devices inside one fast domain (a TPU pod / slice on ICI; GPUs on one NVLink switch);
  collectives whose group spans domains use `scaleout_bandwidth` (TPU data-center network, GPU InfiniBand per GPU),
  None where no figure is recorded.
"""

import dataclasses
import re
from typing import Any, Optional

GIB = 2 ** 30
GB = 10 ** 9


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    name: str  # key in DEVICE_KINDS
    description: str
    peak_flops: Optional[float]  # dense bf16 FLOP/s per device; None: unknown (cpu), MFU not reported
    hbm_bytes: Optional[float]  # device memory; None: not an accelerator, no fit check
    hbm_bandwidth: Optional[float]  # bytes/s
    interconnect_bandwidth: Optional[float]  # bytes/s, both directions added, as quoted by the vendor
    collective_bandwidth: Optional[float]  # bytes/s one device sends in a ring over one mesh axis (see module doc)
    domain_size: Optional[int] = None  # devices per ICI / NVLink domain
    scaleout_bandwidth: Optional[float] = None  # bytes/s per device between domains (DCN / InfiniBand)
    interconnect: str = ""  # 'ICI' / 'NVLink'

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEVICE_KINDS: dict[str, DeviceSpec] = {
    # Google Cloud TPU v4 page (cloud.google.com/tpu/docs/v4): 275 TFLOPs bf16 per chip; "HBM2 capacity and
    # bandwidth 32 GiB, 1200 GBps"; pod 4096 chips, 3D torus. ICI: 6 links per chip, 400 Gb/s = 50 GB/s each way per
    # link (Jouppi et al. 2023, "TPU v4: An Optically Reconfigurable Supercomputer", ISCA) -> 600 GB/s both ways.
    # No per-chip DCN figure on the page: scale-out not modelled.
    "tpu_v4": DeviceSpec(
        name="tpu_v4", description="Cloud TPU v4 (per chip, 2 TensorCores)", peak_flops=275e12,
        hbm_bytes=32 * GIB, hbm_bandwidth=1200 * GB, interconnect_bandwidth=600 * GB,
        collective_bandwidth=600 * GB / 6, domain_size=4096, scaleout_bandwidth=None, interconnect="ICI"),
    # Google Cloud TPU v5e page (docs.cloud.google.com/tpu/docs/v5e): 197 TFLOPs bf16; HBM 16 GiB at 819 GBps;
    # "Bidirectional inter-chip interconnect (ICI) bandwidth (per chip) 400 GBps", 4 ICI ports; pod 256 chips,
    # 2D torus; 2 x 100 Gbps NIC per 8-chip host -> 25 Gb/s = 3.125 GB/s DCN per chip.
    "tpu_v5e": DeviceSpec(
        name="tpu_v5e", description="Cloud TPU v5e (device_kind 'TPU v5 lite')", peak_flops=197e12,
        hbm_bytes=16 * GIB, hbm_bandwidth=819 * GB, interconnect_bandwidth=400 * GB,
        collective_bandwidth=400 * GB / 4, domain_size=256, scaleout_bandwidth=200e9 / 8 / 8, interconnect="ICI"),
    # Google Cloud TPU v5p page (docs.cloud.google.com/tpu/docs/v5p): 459 TFLOPs bf16; HBM 95 GiB at 2765 GBps;
    # "Bidirectional inter-chip interconnect (ICI) bandwidth per chip (GBps) 1200"; 3D torus (6 links); largest
    # slice 6144 chips; "Data center network (DCN) bandwidth per chip (Gbps) 50".
    "tpu_v5p": DeviceSpec(
        name="tpu_v5p", description="Cloud TPU v5p (per chip, 2 TensorCores)", peak_flops=459e12,
        hbm_bytes=95 * GIB, hbm_bandwidth=2765 * GB, interconnect_bandwidth=1200 * GB,
        collective_bandwidth=1200 * GB / 6, domain_size=6144, scaleout_bandwidth=50e9 / 8, interconnect="ICI"),
    # Google Cloud TPU v6e (Trillium) page (docs.cloud.google.com/tpu/docs/v6e): 918 TFLOPs bf16; HBM 32 GB (taken
    # as GiB like v5e's) at 1640 GBps (1600 in one version of the page: 1640 used); "Bidirectional inter-chip
    # interconnect (ICI) bandwidth (per chip) 800 GBps", 4 ICI ports; pod 256 chips, 2D torus; 4 x 200 Gbps NIC
    # per 8-chip host -> 100 Gb/s = 12.5 GB/s DCN per chip.
    "tpu_v6e": DeviceSpec(
        name="tpu_v6e", description="Cloud TPU v6e Trillium (device_kind 'TPU v6 lite')", peak_flops=918e12,
        hbm_bytes=32 * GIB, hbm_bandwidth=1640 * GB, interconnect_bandwidth=800 * GB,
        collective_bandwidth=800 * GB / 4, domain_size=256, scaleout_bandwidth=800e9 / 8 / 8, interconnect="ICI"),
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf), SXM4: BF16 Tensor
    # Core 312 TFLOPS dense (624 with sparsity); 40 GB HBM2 at 1,555 GB/s; NVLink 600 GB/s (12 links, both ways);
    # HGX A100 8-GPU NVSwitch board. Scale-out: DGX A100 has one 200 Gb/s HDR InfiniBand port per GPU = 25 GB/s.
    "a100_40gb": DeviceSpec(
        name="a100_40gb", description="NVIDIA A100 SXM4 40GB", peak_flops=312e12, hbm_bytes=40 * GB,
        hbm_bandwidth=1555 * GB, interconnect_bandwidth=600 * GB, collective_bandwidth=600 * GB / 2, domain_size=8,
        scaleout_bandwidth=200e9 / 8, interconnect="NVLink"),
    # Same datasheet, A100 80GB SXM4: 80 GB HBM2e at 2,039 GB/s; compute and NVLink as the 40GB part.
    "a100_80gb": DeviceSpec(
        name="a100_80gb", description="NVIDIA A100 SXM4 80GB", peak_flops=312e12, hbm_bytes=80 * GB,
        hbm_bandwidth=2039 * GB, interconnect_bandwidth=600 * GB, collective_bandwidth=600 * GB / 2, domain_size=8,
        scaleout_bandwidth=200e9 / 8, interconnect="NVLink"),
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity -> 989 dense;
    # 80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s (18 NVLink 4 links, both ways); HGX H100 8-GPU NVSwitch board.
    # Scale-out: DGX H100 has one 400 Gb/s ConnectX-7 (InfiniBand NDR) per GPU = 50 GB/s.
    "h100": DeviceSpec(
        name="h100", description="NVIDIA H100 SXM5 80GB", peak_flops=989e12, hbm_bytes=80 * GB,
        hbm_bandwidth=3350 * GB, interconnect_bandwidth=900 * GB, collective_bandwidth=900 * GB / 2, domain_size=8,
        scaleout_bandwidth=400e9 / 8, interconnect="NVLink"),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: same GH100 compute as H100 SXM (BF16 1,979 TFLOPS with
    # sparsity -> 989 dense); 141 GB HBM3e at 4.8 TB/s; NVLink 900 GB/s; HGX H200 8-GPU board; 400 Gb/s per GPU.
    "h200": DeviceSpec(
        name="h200", description="NVIDIA H200 SXM 141GB", peak_flops=989e12, hbm_bytes=141 * GB,
        hbm_bandwidth=4800 * GB, interconnect_bandwidth=900 * GB, collective_bandwidth=900 * GB / 2, domain_size=8,
        scaleout_bandwidth=400e9 / 8, interconnect="NVLink"),
    # NVIDIA HGX B200 (DGX B200 / HGX platform datasheet, 1000 W configuration): BF16 Tensor Core 4.5 PFLOPS with
    # sparsity -> 2.25 PFLOPS dense per GPU; 1,440 GB HBM3e per 8-GPU board -> 180 GB per GPU, 8 TB/s per GPU;
    # NVLink 5 1.8 TB/s per GPU (both ways). Scale-out: 400 Gb/s ConnectX-7 per GPU on DGX B200 = 50 GB/s.
    "b200": DeviceSpec(
        name="b200", description="NVIDIA B200 (HGX, 1000 W)", peak_flops=2250e12, hbm_bytes=180 * GB,
        hbm_bandwidth=8000 * GB, interconnect_bandwidth=1800 * GB, collective_bandwidth=1800 * GB / 2,
        domain_size=8, scaleout_bandwidth=400e9 / 8, interconnect="NVLink"),
    # The host CPU (what the planner compiles on): no peak, no HBM; MFU, step time and fit are not reported.
    "cpu": DeviceSpec(
        name="cpu", description="host CPU (no accelerator figures)", peak_flops=None, hbm_bytes=None,
        hbm_bandwidth=None, interconnect_bandwidth=None, collective_bandwidth=None),
}


def device_spec(kind: str) -> DeviceSpec:
    """The DeviceSpec of `kind` (a key of DEVICE_KINDS); ValueError naming it and the known kinds."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device kind {kind!r}; known kinds: {', '.join(DEVICE_KINDS)}")
    return DEVICE_KINDS[kind]


# jax.Device.device_kind strings -> DEVICE_KINDS keys. TPU strings are JAX's ('TPU v5 lite' is v5e, 'TPU v5' is
# v5p, 'TPU v6 lite' is v6e); GPU strings are nvidia-smi's product names. PCIe and NVL variants (other clocks, memory
# bandwidth and links) are not in the table and give None.
_KIND_PATTERNS = (
    (r"^tpu v4$", "tpu_v4"),
    (r"^tpu v5 ?(lite|e)$", "tpu_v5e"),
    (r"^tpu v5p?$", "tpu_v5p"),
    (r"^tpu v6 ?(lite|e)$", "tpu_v6e"),
    (r"^nvidia a100[- ]sxm4?[- ]40gb$", "a100_40gb"),
    (r"^nvidia a100[- ]sxm4?[- ]80gb$", "a100_80gb"),
    (r"^nvidia h100 80gb hbm3$", "h100"),
    (r"^nvidia h100 sxm5?( 80gb)?$", "h100"),
    (r"^nvidia h200( sxm)?( 141gb)?$", "h200"),
    (r"^nvidia b200$", "b200"),
    (r"^cpu$", "cpu"),
)


def detect_device_kind(device: Any) -> Optional[str]:
    """The DEVICE_KINDS key of a `jax.Device` (or of a `device_kind` string), None when it is not in the table."""
    kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
    kind = " ".join(str(kind).strip().lower().split())
    for pattern, name in _KIND_PATTERNS:
        if re.match(pattern, kind):
            return name
    return None
