"""Where each file of an uncompressed tar (a webdataset / img2dataset shard) lives inside it.

`read_tar_index(url)` reads the member headers once, seeking over the member data, and gives each regular
file's name with the byte offset and size of its data (`TarInfo.offset_data`, `TarInfo.size`). Ingest
records these next to `image_ref` (`image_offset`, `image_size`), so that `stages.image_reader` fetches
exactly an image's bytes with one ranged read instead of re-listing the tar.

A tar cut short (a shard whose upload or download stopped) yields the members whose headers come before
the cut; the data of the last of them may itself be cut, which the reader notices from a short read.
Transient I/O errors while listing are retried (`stages.retry`); a file that is not a tar at all raises
`tarfile.ReadError`.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass

import fsspec

from stages.retry import with_retries


@dataclass(frozen=True)
class TarMember:
    name: str  # as stored in the tar
    offset: int  # of the member's data (after its header blocks), from the start of the tar
    size: int  # of the member's data, in bytes


def member_name(name: str) -> str:
    """A member name as refs use it: without a leading `./` or `/`."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def read_tar_index(url: str) -> list[TarMember]:
    """The regular files of the tar at `url` (any fsspec URL), in archive order; sparse members, whose
    data is not stored contiguously, are left out."""
    return with_retries(lambda: _scan(url), what=f"list the members of {url}")


def _scan(url: str) -> list[TarMember]:
    fs, path = fsspec.core.url_to_fs(url)
    members: list[TarMember] = []
    with fs.open(path, "rb") as f:
        archive = tarfile.open(fileobj=f, mode="r:")
        try:
            while (info := archive.next()) is not None:
                if info.isfile() and not info.issparse():
                    members.append(TarMember(info.name, info.offset_data, info.size))
        except tarfile.TarError:
            pass  # a corrupt or missing header: the tar ends here for us
    return members
