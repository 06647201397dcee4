//! A disk to an EBS snapshot with the EBS direct APIs: StartSnapshot,
//! PutSnapshotBlock for every 512 KiB block that is not all zeros (each
//! with its SHA-256), CompleteSnapshot with the linear checksum (SHA-256
//! over the blocks' digests in block order), then the wait until the
//! snapshot is `completed`. AWS's documentation:
//! <https://docs.aws.amazon.com/ebs/latest/userguide/writesnapshots.html>,
//! `ebsapis-using-checksums.html`.
//!
//! Bounded everywhere: one reader and `workers` senders with a queue of
//! `workers` blocks between them (memory does not grow with the disk),
//! explicit SDK timeouts (awslabs/coldsnap#437 is what happens without),
//! throttling retried with backoff within a budget per block. A failed
//! upload deletes its snapshot: nothing pending is left behind.
//!
//! Zero blocks: not sent, so a 4 GiB NixOS disk that is mostly empty costs
//! what its data costs. Except when the new snapshot is encrypted (the
//! account encrypts by default, or a KMS key applies): EBS then returns
//! random data for blocks never written (awslabs/coldsnap#395), so every
//! block is sent.

use crate::aws::{CallError, Clients, Fault, call, classify};
use crate::disk::{BLOCK, Disk};
use crate::progress::Progress;
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, SseType, Tag};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use nixos_ami_agent::retry::Attempt;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, mpsc};

/// Per block, all attempts together.
const BLOCK_BUDGET: Duration = Duration::from_secs(300);
/// A snapshot just started may not be visible to PutSnapshotBlock yet:
/// "wait and retry, with a 2 minute cap" (the EBS team, via coldsnap).
const NOT_FOUND_GRACE: Duration = Duration::from_secs(120);
/// StartSnapshot's `Timeout`: EBS cancels a snapshot nobody writes to.
const SNAPSHOT_TIMEOUT_MINUTES: i32 = 60;
/// The wait for `completed` after CompleteSnapshot.
const COMPLETE_WAIT: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Call(#[from] CallError),
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{region}: snapshot {snapshot}: {reason}")]
    Snapshot {
        region: String,
        snapshot: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub snapshot_id: String,
    pub blocks: u64,
    pub blocks_sent: u64,
}

pub struct Request {
    pub disk: Arc<Disk>,
    pub volume_gib: u64,
    pub description: String,
    pub tags: Vec<(String, String)>,
    /// Makes a retried StartSnapshot return the same snapshot.
    pub client_token: String,
    pub workers: usize,
    /// Send zero blocks too, as if the snapshot were encrypted (what
    /// nixpkgs' upload-ami does in its EBS-direct mode): only for the
    /// benchmark's comparison.
    pub all_blocks: bool,
}

struct Block {
    index: u64,
    data: bytes::Bytes,
    checksum: String,
}

/// Uploads `r.disk`; on failure after the snapshot was started, deletes it.
pub async fn upload(clients: &Clients, r: &Request) -> Result<Uploaded, UploadError> {
    let region = clients.region.as_str();
    let tags: Vec<Tag> = r
        .tags
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect();
    let started = call(region, "StartSnapshot", crate::aws::CALL_BUDGET, || async {
        clients
            .ebs
            .start_snapshot()
            .volume_size(r.volume_gib as i64)
            .timeout(SNAPSHOT_TIMEOUT_MINUTES)
            .client_token(&r.client_token)
            .description(&r.description)
            .set_tags(Some(tags.clone()))
            .send()
            .await
            .map_err(classify)
    })
    .await?;
    let snapshot = started
        .snapshot_id
        .clone()
        .ok_or_else(|| UploadError::Snapshot {
            region: region.into(),
            snapshot: "?".into(),
            reason: "StartSnapshot returned no snapshot id".into(),
        })?;
    let encrypted = matches!(started.sse_type, Some(SseType::SseEbs | SseType::SseKms))
        || started.kms_key_arn.is_some();
    tracing::info!(
        "{region}: snapshot {snapshot} started ({} GiB{})",
        r.volume_gib,
        if encrypted {
            ", encrypted: every block is sent, zero blocks too"
        } else {
            ""
        }
    );
    match send_and_complete(clients, r, &snapshot, encrypted || r.all_blocks).await {
        Ok(u) => Ok(u),
        Err(e) => {
            tracing::warn!("{region}: deleting the incomplete snapshot {snapshot}");
            if let Err(d) = crate::ec2::delete_snapshot(clients, &snapshot).await {
                tracing::error!(
                    "{region}: the incomplete snapshot {snapshot} could not be deleted ({d}); EBS cancels it after {SNAPSHOT_TIMEOUT_MINUTES} minutes"
                );
            }
            Err(e)
        }
    }
}

async fn send_and_complete(
    clients: &Clients,
    r: &Request,
    snapshot: &str,
    every_block: bool,
) -> Result<Uploaded, UploadError> {
    let region = clients.region.as_str();
    let total = r.disk.blocks();
    let progress = Arc::new(Progress::new(&format!("{region}: {snapshot}"), total));
    let workers = r.workers.max(1);
    let (tx, rx) = mpsc::channel::<Result<Block, UploadError>>(workers);
    let rx = Arc::new(Mutex::new(rx));
    let started = Instant::now();

    // The reader: one thread, reading, skipping zeros, hashing.
    let disk_path = r.disk.path().display().to_string();
    let reader = {
        let progress = progress.clone();
        let disk = r.disk.clone();
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; BLOCK];
            for index in 0..total {
                let data = match disk.read_block(index, &mut buf) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(UploadError::Read {
                            path: disk_path.clone(),
                            reason: format!("block {index}: {e}"),
                        }));
                        return;
                    }
                };
                if !data && !every_block {
                    progress.block(false);
                    continue;
                }
                let checksum = STANDARD.encode(Sha256::digest(&buf));
                let block = Block {
                    index,
                    data: bytes::Bytes::copy_from_slice(&buf),
                    checksum,
                };
                if tx.blocking_send(Ok(block)).is_err() {
                    return; // the senders gave up
                }
            }
        })
    };

    // The senders.
    let digests = Arc::new(std::sync::Mutex::new(BTreeMap::<u64, Vec<u8>>::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (rx, clients, snapshot, progress, digests) = (
            rx.clone(),
            clients.clone(),
            snapshot.to_owned(),
            progress.clone(),
            digests.clone(),
        );
        tasks.spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(block) = next else { return Ok(()) };
                let block = block?;
                put_block(&clients, &snapshot, &block, started).await?;
                let digest = STANDARD.decode(&block.checksum).expect("our own base64");
                digests
                    .lock()
                    .expect("not poisoned")
                    .insert(block.index, digest);
                progress.block(true);
            }
        });
    }
    let mut failure = None;
    while let Some(done) = tasks.join_next().await {
        let r = done.unwrap_or_else(|e| {
            Err(UploadError::Snapshot {
                region: region.into(),
                snapshot: snapshot.into(),
                reason: format!("a sender stopped: {e}"),
            })
        });
        if let Err(e) = r
            && failure.is_none()
        {
            failure = Some(e);
            // Stop reading: close the queue so the reader ends.
            rx.lock().await.close();
        }
    }
    let _ = reader.await;
    progress.finish();
    if let Some(e) = failure {
        return Err(e);
    }

    let digests = std::mem::take(&mut *digests.lock().expect("not poisoned"));
    let sent = digests.len() as u64;
    let mut linear = Sha256::new();
    for d in digests.values() {
        linear.update(d);
    }
    let linear = STANDARD.encode(linear.finalize());
    tracing::info!(
        "{region}: {sent} of {total} blocks sent in {:.1}s; completing {snapshot}",
        started.elapsed().as_secs_f64()
    );
    call(
        region,
        "CompleteSnapshot",
        crate::aws::CALL_BUDGET,
        || async {
            let mut req = clients
                .ebs
                .complete_snapshot()
                .snapshot_id(snapshot)
                .changed_blocks_count(sent as i32);
            if sent > 0 {
                req = req
                    .checksum(&linear)
                    .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                    .checksum_aggregation_method(
                        ChecksumAggregationMethod::ChecksumAggregationLinear,
                    );
            }
            req.send().await.map_err(classify)
        },
    )
    .await?;
    crate::ec2::wait_snapshot_completed(clients, snapshot, COMPLETE_WAIT).await?;
    crate::ec2::tag(
        clients,
        &[snapshot.to_owned()],
        &[(crate::naming::COMPLETE_TAG.to_owned(), "true".to_owned())],
    )
    .await?;
    Ok(Uploaded {
        snapshot_id: snapshot.to_owned(),
        blocks: total,
        blocks_sent: sent,
    })
}

async fn put_block(
    clients: &Clients,
    snapshot: &str,
    b: &Block,
    started: Instant,
) -> Result<(), UploadError> {
    let region = clients.region.as_str();
    let index = i32::try_from(b.index).map_err(|_| UploadError::Snapshot {
        region: region.into(),
        snapshot: snapshot.into(),
        reason: format!("block {} is beyond what EBS addresses", b.index),
    })?;
    let what = format!("PutSnapshotBlock {snapshot} #{}", b.index);
    call(region, &what, BLOCK_BUDGET, || async {
        clients
            .ebs
            .put_snapshot_block()
            .snapshot_id(snapshot)
            .block_index(index)
            .block_data(ByteStream::from(b.data.clone()))
            .data_length(BLOCK as i32)
            .checksum(&b.checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .send()
            .await
            .map_err(|e| match classify(e) {
                // A snapshot just started may not be visible yet.
                Attempt::Fail(f)
                    if f.code.as_deref() == Some("ResourceNotFoundException")
                        && started.elapsed() < NOT_FOUND_GRACE =>
                {
                    Attempt::retry(Fault { ..f })
                }
                other => other,
            })
    })
    .await?;
    Ok(())
}
