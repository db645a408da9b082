"""Registry of the public datasets the papers use, and ``prepare_dataset`` (download ->
verify -> extract safely -> convert to MVTec layout).

Where the URLs and checksums come from (none of these hosts is reachable from the build
machine, so none was re-hashed here; every value is copied from the public source named):

* MVTec AD: URL and SHA-256 from anomalib (open-edge-platform/anomalib,
  src/anomalib/data/datamodules/image/mvtecad.py, ``DOWNLOAD_INFO``; anomalib's check_hash
  uses SHA-256).
* MVTec LOCO AD: URL and SHA-256 from anomalib (openvinotoolkit/anomalib,
  src/anomalib/data/image/mvtec_loco.py, ``DOWNLOAD_INFO``); the same SHA-256 is reported
  as re-measured in an unrelated project's dataset notes.
* BTAD: URL and SHA-256 from anomalib (datamodules/image/btech.py).
* VisA: URL and SHA-256 from anomalib (datamodules/image/visa.py).
* KolektorSDD2: URL go.vicos.si/kolektorsdd2 (the authors' short link, widely used; it
  redirects to data.vicos.si/datasets/KSDD/KolektorSDD2.zip). The publisher gives no
  checksum and anomalib does not ship this dataset; the SHA-256 and size below are from a
  third-party project's dataset notes that state they were measured on the download (the
  size 853126555 also appears, independently, in another project's download script).
  Treat it as community-verified, not publisher-verified.
* Magnetic Tile Defects: a GitHub repository (abin24/Magnetic-tile-defect-datasets.,
  the trailing dot is part of its name) without releases; GitHub's branch zip is not
  byte-stable, so **no checksum exists**: ``prepare_dataset`` refuses it unless
  ``insecure_skip_checksum=True`` (CLI ``--insecure-skip-checksum``), or the user places
  an already extracted tree under the raw folder.

``raw_root`` holds the archives (``raw_root/<filename>``); they are extracted to
``raw_root/extracted/<dataset>``. A tree the user unpacked by hand anywhere under
``raw_root`` (up to three levels deep) is found and used as is, so no archive is needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from defectlab.data.convert import (
    BTAD_CATEGORIES,
    CONVERTERS,
    MVTEC_AD_CATEGORIES,
    MVTEC_LOCO_CATEGORIES,
    VISA_CATEGORIES,
)
from defectlab.data.download import download_file, safe_extract, verify_file
from defectlab.errors import ConfigError, DownloadError, ResourceMissingError
from defectlab.io import atomic_dir, write_json

CC_BY_NC_SA = "CC BY-NC-SA 4.0 (non-commercial, share-alike)"


@dataclass(frozen=True)
class Archive:
    filename: str
    url: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    source: str = ""  # where the checksum comes from

    @property
    def verifiable(self) -> bool:
        return self.sha256 is not None or self.md5 is not None


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str
    license: str
    homepage: str
    archives: tuple[Archive, ...]
    categories: tuple[str, ...]
    notes: str = ""


REGISTRY: dict[str, DatasetSpec] = {
    "mvtec_ad": DatasetSpec(
        "mvtec_ad", "MVTec AD (Bergmann et al., CVPR 2019 / IJCV 2021)", CC_BY_NC_SA,
        "https://www.mvtec.com/company/research/datasets/mvtec-ad",
        (Archive("mvtec_anomaly_detection.tar.xz",
                 "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f283/download/"
                 "420938113-1629960298/mvtec_anomaly_detection.tar.xz",
                 sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
                 source="anomalib datamodules/image/mvtecad.py"),),
        MVTEC_AD_CATEGORIES,
        "MVTec asks users to accept its license on the download page first.",
    ),
    "mvtec_loco": DatasetSpec(
        "mvtec_loco", "MVTec LOCO AD (Bergmann et al., IJCV 2022)", CC_BY_NC_SA,
        "https://www.mvtec.com/company/research/datasets/mvtec-loco",
        (Archive("mvtec_loco_anomaly_detection.tar.xz",
                 "https://www.mydrive.ch/shares/48237/1b9106ccdfbb09a0c414bd49fe44a14a/download/"
                 "430647091-1646842701/mvtec_loco_anomaly_detection.tar.xz",
                 sha256="9e7c84dba550fd2e59d8e9e231c929c45ba737b6b6a6d3814100f54d63aae687",
                 source="anomalib (openvinotoolkit) data/image/mvtec_loco.py"),),
        MVTEC_LOCO_CATEGORIES,
        "Per-defect mask folders and defects_config.json (sPRO saturation) are kept.",
    ),
    "btad": DatasetSpec(
        "btad", "BTAD beanTech Anomaly Detection (Mishra et al., 2021)", CC_BY_NC_SA,
        "https://avires.dimi.uniud.it/papers/btad/",
        (Archive("btad.zip", "https://avires.dimi.uniud.it/papers/btad/btad.zip",
                 sha256="461c9387e515bfed41ecaae07c50cf6b10def647b36c9e31d239ab2736b10d2a",
                 source="anomalib datamodules/image/btech.py"),),
        BTAD_CATEGORIES,
    ),
    "ksdd2": DatasetSpec(
        "ksdd2", "KolektorSDD2 (Bozic et al., Computers in Industry 2021)", CC_BY_NC_SA,
        "https://www.vicos.si/resources/kolektorsdd2/",
        (Archive("KolektorSDD2.zip", "https://go.vicos.si/kolektorsdd2",
                 sha256="edcdb486809b24f1d17b785e30c52fafc5999554dd5fe18ddf77b61ceb6f36a8",
                 size=853126555,
                 source="third-party dataset notes (community-measured; the publisher gives none)"),),
        ("ksdd2",),
        "Defective training images kept apart in labelled/ (DSR's supervised protocol); never scored.",
    ),
    "mtd": DatasetSpec(
        "mtd", "Magnetic Tile Defects (Huang et al., The Visual Computer 2020)",
        "no license file in the repository; research use with citation as its README asks",
        "https://github.com/abin24/Magnetic-tile-defect-datasets.",
        (Archive("Magnetic-tile-defect-datasets.-master.zip",
                 "https://codeload.github.com/abin24/Magnetic-tile-defect-datasets./zip/refs/heads/master",
                 source="none: GitHub branch archives are not byte-stable; needs --insecure-skip-checksum"),),
        ("magnetic_tile",),
        "MT_Free split 80/20 into train/test by a file-name hash.",
    ),
    "visa": DatasetSpec(
        "visa", "VisA Visual Anomaly (Zou et al., ECCV 2022)",
        "CC BY 4.0 (per the publisher's spot-diff README; anomalib's docstring says CC BY-NC-SA 4.0)",
        "https://github.com/amazon-science/spot-diff",
        (Archive("VisA_20220922.tar", "https://amazon-visual-anomaly.s3.us-west-2.amazonaws.com/VisA_20220922.tar",
                 sha256="2eb8690c803ab37de0324772964100169ec8ba1fa3f7e94291c9ca673f40f362",
                 source="anomalib datamodules/image/visa.py"),),
        VISA_CATEGORIES,
        "Converted with the official split_csv/1cls.csv.",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in REGISTRY:
        raise ConfigError(f"unknown dataset {name!r}; registry: {', '.join(sorted(REGISTRY))} "
                          "(or 'demo' in params.yaml)")
    return REGISTRY[name]


# --------------------------------------------------------------------------- archives


def _fetch_hint(spec: DatasetSpec, raw_root: Path) -> str:
    files = ", ".join(f"{a.filename} from {a.url}" for a in spec.archives)
    flag = "" if all(a.verifiable for a in spec.archives) else " --insecure-skip-checksum"
    return (f"put {files} into {raw_root}/ (or unpack the dataset anywhere under {raw_root}), "
            f"or fetch it with: defectlab download {spec.name} --raw-dir {raw_root}{flag} "
            f"(license: {spec.license}; see {spec.homepage})")


def verify_archive(path: Path, archive: Archive, *, insecure_skip_checksum: bool = False) -> None:
    """Check ``path`` against the registry checksum; the result is cached in a stamp file
    (size + mtime + digest) so a 5 GB archive is hashed once, not at every prepare."""
    if not archive.verifiable:
        if insecure_skip_checksum:
            return
        raise DownloadError(f"{path}: no published checksum exists for {archive.filename} "
                            f"({archive.source}); pass --insecure-skip-checksum to use it unverified")
    stamp = path.with_name(f".{path.name}.verified.json")
    st = path.stat()
    expected = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": archive.sha256, "md5": archive.md5}
    try:
        if json.loads(stamp.read_text()) == expected:
            return
    except (OSError, ValueError):
        pass
    verify_file(path, sha256=archive.sha256, md5=archive.md5, size=archive.size)
    write_json(stamp, expected)


def fetch_dataset(name: str, raw_root: str | Path, *, download: bool = True, insecure_skip_checksum: bool = False,
                  progress: bool = True) -> Path:
    """Make the dataset's original tree available under ``raw_root``; return its folder.

    Order: an already unpacked tree under ``raw_root`` -> the archives in ``raw_root``
    (verified, then safely extracted to ``raw_root/extracted/<name>``) -> download them
    (only with ``download``). Otherwise ``ResourceMissingError`` says where to put what.
    """
    spec = get_spec(name)
    raw_root = Path(raw_root)
    locate, _ = CONVERTERS[name]
    extracted = raw_root / "extracted" / name
    found = locate(extracted) or locate(raw_root)
    if found is not None:
        return found
    missing = [a for a in spec.archives if not (raw_root / a.filename).is_file()]
    if missing and not download:
        raise ResourceMissingError(f"dataset {name!r} not found: {_fetch_hint(spec, raw_root)}")
    for archive in spec.archives:
        path = raw_root / archive.filename
        if not path.is_file():
            download_file(archive.url, path, sha256=archive.sha256, md5=archive.md5, size=archive.size,
                          allow_unverified=insecure_skip_checksum, progress=progress)
        verify_archive(path, archive, insecure_skip_checksum=insecure_skip_checksum)
        single = len(spec.archives) == 1
        safe_extract(path, extracted if single else extracted / archive.filename.split(".")[0])
    found = locate(extracted)
    if found is None:
        raise ResourceMissingError(f"{extracted}: the extracted archive does not have the expected "
                                   f"{spec.title} layout; {_fetch_hint(spec, raw_root)}")
    return found


def prepare_dataset(source: str, raw_root: str | Path, out_dir: str | Path, download: bool = False, *,
                    categories: list[str] | None = None, insecure_skip_checksum: bool = False,
                    link: str = "hardlink", progress: bool = True) -> dict:
    """Put registry dataset ``source`` in MVTec layout under ``out_dir`` (replaced as a whole,
    atomically): one folder per category, ``defects.json`` each, ``SOURCE.json`` at the top.

    ``categories``: convert only these (None: all of the dataset's); the archive or unpacked
    tree may hold only them. ``download=False`` and nothing under ``raw_root`` ->
    ``ResourceMissingError`` with the file names, URLs and the command that fetches them.
    Returns per-category counts.
    """
    spec = get_spec(source)
    src = fetch_dataset(source, raw_root, download=download, insecure_skip_checksum=insecure_skip_checksum,
                        progress=progress)
    _, convert = CONVERTERS[source]
    with atomic_dir(out_dir) as tmp:
        summary = convert(src, tmp, categories, link=link)
        write_json(tmp / "SOURCE.json", {
            "dataset": spec.name, "title": spec.title, "license": spec.license, "homepage": spec.homepage,
            "archives": [{"filename": a.filename, "url": a.url, "sha256": a.sha256, "md5": a.md5,
                          "checksum_source": a.source} for a in spec.archives],
            "counts": summary,
        })
    return summary
