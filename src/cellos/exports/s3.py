"""``CELLOS_EXPORT_S3=s3://bucket/prefix``: artifacts go to ``<prefix>/<cellId>/<name>``.

boto3 (the ``s3`` extra) is imported only here, and this module only when the variable is set.
Endpoint, region and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL_S3`` or
``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``...), read from
the supervisor's environment, else boto3's own chain (profiles, instance roles).

The server verifies the bytes: a small artifact is one PutObject with ``ChecksumSHA256`` (the
whole artifact's digest); a large one is a multipart upload with ``ChecksumAlgorithm=SHA256``
where every part carries its own ``ChecksumSHA256``, which the server checks, and the whole
artifact's sha256 is stored as ``x-amz-meta-sha256``. A multipart upload that fails is aborted,
so a partial object is never left behind nor reported as exported.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Mapping
from typing import Any, BinaryIO

from cellos.core.errors import ExportError, PolicyRefused
from cellos.core.ports import ExportReceipt
from cellos.exports.names import check_export_target
from cellos.exports.staging import Staged, stage

S3_VAR = "CELLOS_EXPORT_S3"
#: Above this, multipart (S3 allows 5 GiB in one PUT, but a retry then resends everything).
MULTIPART_THRESHOLD = 16 << 20
PART_SIZE = 16 << 20
_MAX_PARTS = 10_000


def parse_s3_url(raw: str) -> tuple[str, str]:
    if not raw.startswith("s3://"):
        raise PolicyRefused(S3_VAR, "must be s3://bucket or s3://bucket/prefix")
    bucket, _, prefix = raw[len("s3://") :].partition("/")
    if not bucket or any(c in bucket for c in "?#") or "?" in prefix or "#" in prefix:
        raise PolicyRefused(S3_VAR, "must be s3://bucket or s3://bucket/prefix")
    return bucket, prefix.strip("/")


def _client(env: Mapping[str, str]) -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise PolicyRefused(
            S3_VAR, "needs boto3 (install the s3 extra: pip install 'cellos[s3]')"
        ) from None

    def get(*names: str) -> str | None:
        for name in names:
            if value := env.get(name, "").strip():
                return value
        return None

    session = boto3.session.Session(
        aws_access_key_id=get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=get("AWS_SESSION_TOKEN"),
        region_name=get("AWS_REGION", "AWS_DEFAULT_REGION"),
        profile_name=get("AWS_PROFILE"),
    )
    return session.client(
        "s3",
        endpoint_url=get("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        # Bounded retries with botocore's own backoff (standard mode: 3 attempts in all).
        config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=30),
    )


class S3ExportSink:
    name = "s3"

    def __init__(self, url: str, env: Mapping[str, str], client: Any = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self._client = client if client is not None else _client(env)

    def key(self, cell_id: str, name: str) -> str:
        return "/".join(p for p in (self.prefix, cell_id, name) if p)

    def export(self, cell_id: str, name: str, source: BinaryIO) -> ExportReceipt:
        check_export_target(cell_id, name)
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            staged = stage(source)
        except OSError as exc:
            raise ExportError(name, f"cannot read artifact: {exc.strerror or exc}") from None
        key = self.key(cell_id, name)
        destination = f"s3://{self.bucket}/{key}"
        try:
            if staged.size <= MULTIPART_THRESHOLD:
                self._put(key, staged)
            else:
                self._multipart(key, staged)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            reason = f"{error.get('Code', 'error')}: {error.get('Message', '')}".rstrip(": ")
            raise ExportError(S3_VAR, f"upload to {destination} failed: {reason}") from None
        except (BotoCoreError, OSError) as exc:
            raise ExportError(S3_VAR, f"upload to {destination} failed: {exc}") from None
        finally:
            staged.close()
        return ExportReceipt(
            name=name, destination=destination, size_bytes=staged.size, sha256=staged.sha256_hex
        )

    def _put(self, key: str, staged: Staged) -> None:
        staged.rewind()
        self._client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=staged.file.read(),
            ContentLength=staged.size,
            # Both: the algorithm names the header, the value is ours (botocore computes none).
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=staged.sha256_b64,
            Metadata={"sha256": staged.sha256_hex},
        )

    def _multipart(self, key: str, staged: Staged) -> None:
        part_size = max(PART_SIZE, -(-staged.size // _MAX_PARTS))
        upload = self._client.create_multipart_upload(
            Bucket=self.bucket,
            Key=key,
            ChecksumAlgorithm="SHA256",
            Metadata={"sha256": staged.sha256_hex},
        )
        upload_id = upload["UploadId"]
        try:
            staged.rewind()
            parts = []
            number = 1
            while chunk := staged.file.read(part_size):
                checksum = base64.b64encode(hashlib.sha256(chunk).digest()).decode("ascii")
                answer = self._client.upload_part(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=chunk,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=checksum,
                )
                parts.append(
                    {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum}
                )
                number += 1
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Never leave the parts behind: they cost storage and are not the artifact.
            # The upload's own error is the one to report, not the abort's.
            with contextlib.suppress(Exception):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise
