"""Jobs as their requesters see them: state, and the finished model's download."""

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from service import jobs
from service.deps import JobId, MemberDep, SessionDep
from service.schemas import JobPublic
from service.states import JobState

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _found(session, job_id: int, team_id: int):
    job = jobs.get(session, job_id, team_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


@router.get("/{job_id}")
def get_job(job_id: JobId, who: MemberDep, session: SessionDep) -> JobPublic:
    return jobs.public(_found(session, job_id, who.team_id))


@router.get("/{job_id}/download", response_class=FileResponse,
            responses={200: {"content": {"application/x-tar": {}}}})
def download(job_id: JobId, who: MemberDep, session: SessionDep) -> FileResponse:
    """The merged model as a tar archive of its directory (config, tokenizer, safetensors shards)."""
    job = _found(session, job_id, who.team_id)
    if job.state != JobState.DONE or not job.artifact or not Path(job.artifact).is_file():
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job_id} is {job.state}: nothing to download yet"
                            if job.state != JobState.DONE else f"job {job_id}'s archive is gone from the server")
    return FileResponse(job.artifact, media_type="application/x-tar", filename=Path(job.artifact).name)
