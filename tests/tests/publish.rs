//! `nixos-ami-publish` against moto (EC2, EBS, SSM), with the double in
//! front of it for what moto lacks (tests/src/aws_double.rs), all on
//! 127.0.0.1 with fake static credentials. Snapshots are read back from
//! moto's EBS API and compared with the image block by block.

use nixos_ami_agent_tests::aws_double::{AwsDouble, Fault, FaultKind};
use nixos_ami_agent_tests::harness::{Output, finish, publish_command};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const REGION: &str = "eu-west-1";
const BLOCK: u64 = 512 * 1024;

fn skip() -> bool {
    if nixos_ami_agent_tests::moto::server().is_none() {
        eprintln!(
            "SKIPPED: moto_server is not installed (scripts/test installs it into target/tools/moto)"
        );
        return true;
    }
    false
}

struct Fixture {
    double: AwsDouble,
    dir: tempfile::TempDir,
}

/// A disk: its size and the blocks holding data (block index → fill byte).
struct Image {
    size: u64,
    data: Vec<(u64, u8)>,
}

impl Image {
    fn sparse() -> Self {
        // 1 GiB, mostly zeros, like a freshly built NixOS disk.
        Self {
            size: 1 << 30,
            data: vec![(0, 1), (1, 2), (700, 3), (2047, 4)],
        }
    }

    fn bytes_of_block(&self, index: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK as usize];
        if let Some((_, fill)) = self.data.iter().find(|(i, _)| *i == index) {
            // Not uniform: the first and last bytes differ.
            b.fill(*fill);
            b[0] = 0xAA;
            b[BLOCK as usize - 1] = 0x55;
        }
        b
    }

    fn write_raw(&self, path: &Path) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(path).unwrap();
        f.set_len(self.size).unwrap();
        for (i, _) in &self.data {
            f.write_all_at(&self.bytes_of_block(*i), i * BLOCK).unwrap();
        }
    }
}

impl Fixture {
    fn new() -> Self {
        Self {
            double: AwsDouble::start(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `<dir>/<name>/nix-support/image-info.json` describing `disk`.
    fn image_info(
        &self,
        name: &str,
        disk: &Path,
        logical: u64,
        system: &str,
        boot: &str,
    ) -> PathBuf {
        let info = self.path(&format!("{name}/nix-support/image-info.json"));
        std::fs::create_dir_all(info.parent().unwrap()).unwrap();
        std::fs::write(
            &info,
            serde_json::json!({
                "label": "26.05.20261129.abcdef0",
                "boot_mode": boot,
                "system": system,
                "logical_bytes": logical.to_string(),
                "file": disk,
                "disks": {"root": {"logical_bytes": logical.to_string(), "file": disk}},
            })
            .to_string(),
        )
        .unwrap();
        info
    }

    fn raw_image(&self, name: &str, img: &Image) -> PathBuf {
        let disk = self.path(&format!("{name}.raw"));
        img.write_raw(&disk);
        self.image_info(name, &disk, img.size, "x86_64-linux", "legacy-bios")
    }

    fn command(&self, args: &[&str]) -> Command {
        publish_command(&self.double.url(), REGION, self.dir.path(), args)
    }

    fn run(&self, args: &[&str]) -> Output {
        finish(
            self.command(args).spawn().unwrap(),
            Duration::from_secs(120),
        )
    }

    fn upload(&self, info: &Path, extra: &[&str]) -> Output {
        let mut args = vec![
            "upload",
            "--image-info",
            info.to_str().unwrap(),
            "--prefix",
            "test/nixos/",
            "--json",
            "--wait",
            "60s",
        ];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Our images in `region`, straight from moto: (id, name).
    fn images(&self, region: &str) -> Vec<(String, String)> {
        let xml = self
            .double
            .ec2(region, &[("Action", "DescribeImages"), ("Owner.1", "self")]);
        items(&xml, "imageId")
            .into_iter()
            .zip(items(&xml, "name"))
            .collect()
    }

    /// Our snapshots in `region` tagged ManagedBy=nixos-ami-publish.
    fn snapshots(&self, region: &str) -> Vec<String> {
        let xml = self.double.ec2(
            region,
            &[
                ("Action", "DescribeSnapshots"),
                ("Owner.1", "self"),
                ("Filter.1.Name", "tag:ManagedBy"),
                ("Filter.1.Value.1", "nixos-ami-publish"),
            ],
        );
        items(&xml, "snapshotId")
    }

    /// Every block moto's EBS holds for a snapshot.
    fn blocks(&self, region: &str, snapshot: &str) -> BTreeMap<u64, Vec<u8>> {
        let list: serde_json::Value = serde_json::from_slice(
            &self
                .double
                .ebs_get(region, &format!("/snapshots/{snapshot}/blocks")),
        )
        .unwrap();
        list["Blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                let i = b["BlockIndex"].as_u64().unwrap();
                let t = b["BlockToken"].as_str().unwrap();
                let data = self.double.ebs_get(
                    region,
                    &format!("/snapshots/{snapshot}/blocks/{i}?blockToken={t}"),
                );
                (i, data)
            })
            .collect()
    }
}

/// Every `<tag>…</tag>` in document order.
fn items(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = vec![];
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].to_owned());
        rest = &after[j + close.len()..];
    }
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// The snapshot the publisher made for the AMI: of the image's snapshots
/// (moto adds one of its own to every AMI), the one tagged as ours.
fn snapshot_of(f: &Fixture, out: &Output, region: &str) -> String {
    let ours = f.snapshots(region);
    json(out)["regions"][region]["snapshot_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .find(|s| ours.contains(s))
        .unwrap_or_else(|| panic!("none of the AMI's snapshots is ours: {out:?} {ours:?}"))
}

/// The snapshot holds exactly the image's non-zero blocks, byte for byte.
fn assert_snapshot_is(f: &Fixture, region: &str, snapshot: &str, img: &Image) {
    let blocks = f.blocks(region, snapshot);
    let expected: Vec<u64> = img.data.iter().map(|(i, _)| *i).collect();
    assert_eq!(
        blocks.keys().copied().collect::<Vec<_>>(),
        expected,
        "only the non-zero blocks were sent"
    );
    for (i, data) in &blocks {
        assert!(*data == img.bytes_of_block(*i), "block {i} differs");
    }
}

#[test]
fn a_sparse_image_sends_only_its_data_and_reads_back_equal() {
    if skip() {
        return;
    }
    let f = Fixture::new();
    let img = Image::sparse();
    let info = f.raw_image("sparse", &img);
    let out = f.upload(&info, &["--run-id", "1"]);
    assert_eq!(out.code, 0, "{out:?}");
    let v = json(&out);
    let name = "test/nixos/26.05.20261129.abcdef0-x86_64-linux.1";
    assert_eq!(v["name"], name);
    let image_id = v["regions"][REGION]["image_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(f.images(REGION), [(image_id, name.to_owned())]);
    let snapshot = snapshot_of(&f, &out, REGION);
    assert_snapshot_is(&f, REGION, &snapshot, &img);

    // What went over the wire: 4 blocks of 2048, checksums, the volume.
    let puts = f.double.calls_of("PutSnapshotBlock");
    assert_eq!(puts.len(), 4, "{puts:?}");
    assert!(puts.iter().all(|c| c.params.contains_key("checksum")));
    let start = &f.double.calls_of("StartSnapshot")[0];
    let body: serde_json::Value = serde_json::from_str(&start.params["body"]).unwrap();
    assert_eq!(body["VolumeSize"], 1);
    assert_eq!(body["ClientToken"].as_str().unwrap().len(), 64);
    let complete = f.double.calls_of("CompleteSnapshot");
    assert_eq!(complete.len(), 1);
    // Registration as NixOS/amis registers: gp3, ENA, SR-IOV, IMDSv2.
    let reg = &f.double.calls_of("RegisterImage")[0].params;
    for (k, v) in [
        ("Name", name),
        ("Architecture", "x86_64"),
        ("BootMode", "legacy-bios"),
        ("RootDeviceName", "/dev/xvda"),
        ("VirtualizationType", "hvm"),
        ("EnaSupport", "true"),
        ("SriovNetSupport", "simple"),
        ("ImdsSupport", "v2.0"),
        ("BlockDeviceMapping.1.DeviceName", "/dev/xvda"),
        ("BlockDeviceMapping.1.Ebs.VolumeType", "gp3"),
        ("BlockDeviceMapping.1.Ebs.SnapshotId", snapshot.as_str()),
    ] {
        assert_eq!(reg.get(k).map(String::as_str), Some(v), "{k}: {reg:?}");
    }
    assert!(!reg.contains_key("TpmSupport"));
}

#[test]
fn a_vhd_of_the_same_disk_gives_the_same_snapshot() {
    if skip() {
        return;
    }
    let f = Fixture::new();
    let img = Image::sparse();
    let raw = f.path("same.raw");
    img.write_raw(&raw);
    let raw_info = f.image_info("raw", &raw, img.size, "x86_64-linux", "legacy-bios");
    // As `qemu-img convert -O vpc` writes it: dynamic, and rounded up to
    // a CHS geometry (here 24 sectors more).
    let vhd_size = img.size + 24 * 512;
    let vhd = f.path("same.vhd");
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vpc"])
        .arg(&raw)
        .arg(&vhd)
        .status();
    let vhd_size = match status {
        Ok(s) if s.success() => {
            // qemu decides the rounding; read what it wrote.
            let out = Command::new("qemu-img")
                .args(["info", "--output", "json"])
                .arg(&vhd)
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["virtual-size"].as_u64().unwrap()
        }
        _ => {
            eprintln!("qemu-img is missing: writing the VHD with the test's own writer");
            let raw_bytes = std::fs::read(&raw).unwrap();
            std::fs::write(&vhd, write_dynamic_vhd(&raw_bytes, vhd_size)).unwrap();
            vhd_size
        }
    };
    let vhd_info = f.image_info("vhd", &vhd, vhd_size, "x86_64-linux", "legacy-bios");
    let a = f.upload(&raw_info, &["--run-id", "raw"]);
    let b = f.upload(&vhd_info, &["--run-id", "vhd"]);
    assert_eq!((a.code, b.code), (0, 0), "{a:?}\n{b:?}");
    let (sa, sb) = (snapshot_of(&f, &a, REGION), snapshot_of(&f, &b, REGION));
    assert_eq!(f.blocks(REGION, &sa), f.blocks(REGION, &sb));
    assert_snapshot_is(&f, REGION, &sb, &img);
    let sizes: Vec<serde_json::Value> = f
        .double
        .calls_of("StartSnapshot")
        .iter()
        .map(|c| {
            serde_json::from_str::<serde_json::Value>(&c.params["body"]).unwrap()["VolumeSize"]
                .clone()
        })
        .collect();
    assert_eq!(sizes, [1, 1], "the VHD's rounding is not a second GiB");
}

/// A dynamic VHD as qemu writes one (footer, header, table, blocks), for
/// machines without qemu-img.
fn write_dynamic_vhd(raw: &[u8], size: u64) -> Vec<u8> {
    fn checksum(b: &[u8], field: usize) -> u32 {
        !b.iter()
            .enumerate()
            .filter(|(i, _)| !(field..field + 4).contains(i))
            .fold(0u32, |s, (_, &x)| s.wrapping_add(u32::from(x)))
    }
    let footer = {
        let mut f = [0u8; 512];
        f[..8].copy_from_slice(b"conectix");
        f[8..12].copy_from_slice(&2u32.to_be_bytes());
        f[12..16].copy_from_slice(&0x10000u32.to_be_bytes());
        f[16..24].copy_from_slice(&512u64.to_be_bytes());
        f[28..32].copy_from_slice(b"qemu");
        f[40..48].copy_from_slice(&size.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[60..64].copy_from_slice(&3u32.to_be_bytes());
        let c = checksum(&f, 64);
        f[64..68].copy_from_slice(&c.to_be_bytes());
        f
    };
    const BS: u64 = 2 << 20;
    let entries = size.div_ceil(BS);
    let mut out = footer.to_vec();
    let mut h = [0u8; 1024];
    h[..8].copy_from_slice(b"cxsparse");
    h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    h[16..24].copy_from_slice(&1536u64.to_be_bytes());
    h[24..28].copy_from_slice(&0x10000u32.to_be_bytes());
    h[28..32].copy_from_slice(&(entries as u32).to_be_bytes());
    h[32..36].copy_from_slice(&(BS as u32).to_be_bytes());
    let c = checksum(&h, 36);
    h[36..40].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&h);
    let table_end = (1536 + entries * 4).div_ceil(512) * 512;
    out.resize(table_end as usize, 0xff);
    for i in 0..entries {
        let (s, e) = (i * BS, ((i + 1) * BS).min(raw.len() as u64));
        if s >= raw.len() as u64 || raw[s as usize..e as usize].iter().all(|&b| b == 0) {
            continue;
        }
        let sector = (out.len() / 512) as u32;
        let at = 1536 + i as usize * 4;
        out[at..at + 4].copy_from_slice(&sector.to_be_bytes());
        out.extend_from_slice(&[0xff; 512]);
        let mut blk = raw[s as usize..e as usize].to_vec();
        blk.resize(BS as usize, 0);
        out.extend_from_slice(&blk);
    }
    out.extend_from_slice(&footer);
    out
}

#[test]
fn a_second_run_reuses_everything_and_creates_nothing() {
    if skip() {
        return;
    }
    let f = Fixture::new();
    let info = f.raw_image("again", &Image::sparse());
    let first = f.upload(&info, &["--run-id", "7"]);
    assert_eq!(first.code, 0, "{first:?}");
    let before = f.double.calls().len();
    let second = f.upload(&info, &["--run-id", "7"]);
    assert_eq!(second.code, 0, "{second:?}");
    assert_eq!(
        json(&first)["regions"][REGION]["image_id"],
        json(&second)["regions"][REGION]["image_id"]
    );
    assert_eq!(json(&second)["regions"][REGION]["reused"], true);
    let made: Vec<String> = f.double.calls()[before..]
        .iter()
        .map(|c| c.action.clone())
        .filter(|a| !a.starts_with("Describe") && a != "CreateTags")
        .collect();
    assert!(made.is_empty(), "the second run made {made:?}");
    assert_eq!(f.images(REGION).len(), 1);
    assert_eq!(f.snapshots(REGION).len(), 1);
}

/// Kills the publisher once `action` has been seen `n` times (the double
/// holds that reply back), then runs it again to the end.
fn killed_then_rerun(action: &str, n: u32, regions: &[&str]) -> (Fixture, Output) {
    let f = Fixture::new();
    let info = f.raw_image("killed", &Image::sparse());
    f.double.with(|s| {
        s.faults.push(Fault {
            after: n - 1,
            ..Fault::new(action, FaultKind::HoldReply(Duration::from_secs(30)))
        })
    });
    let list = regions.join(",");
    let mut args = vec![
        "upload".to_owned(),
        "--image-info".to_owned(),
        info.display().to_string(),
        "--prefix".to_owned(),
        "test/nixos/".to_owned(),
        "--run-id".to_owned(),
        "k".to_owned(),
        "--json".to_owned(),
        "--workers".to_owned(),
        "1".to_owned(),
    ];
    if !regions.is_empty() {
        args.push("--regions".into());
        args.push(list.clone());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut child = f.command(&refs).spawn().unwrap();
    let start = Instant::now();
    while f.double.calls_of(action).len() < n as usize {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{action} never came"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    f.double.with(|s| s.faults.clear());
    let out = f.run(&refs);
    (f, out)
}

#[test]
fn sigkill_during_the_upload_then_a_rerun_leaves_one_snapshot() {
    if skip() {
        return;
    }
    let (f, out) = killed_then_rerun("PutSnapshotBlock", 2, &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(f.images(REGION).len(), 1);
    assert_eq!(
        f.snapshots(REGION),
        [snapshot_of(&f, &out, REGION)],
        "the interrupted upload's snapshot was deleted, one remains"
    );
    assert!(out.stderr.contains("did not finish"), "{out:?}");
    assert_snapshot_is(&f, REGION, &snapshot_of(&f, &out, REGION), &Image::sparse());
}

#[test]
fn sigkill_during_registration_then_a_rerun_registers_once() {
    if skip() {
        return;
    }
    let (f, out) = killed_then_rerun("RegisterImage", 1, &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(f.images(REGION).len(), 1, "one AMI");
    assert_eq!(f.snapshots(REGION).len(), 1, "one snapshot");
    assert_eq!(f.double.calls_of("RegisterImage").len(), 1);
}

#[test]
fn sigkill_during_copies_then_a_rerun_copies_once() {
    if skip() {
        return;
    }
    let (f, out) = killed_then_rerun("CopyImage", 1, &["us-east-2", "ap-south-1"]);
    assert_eq!(out.code, 0, "{out:?}");
    for r in [REGION, "us-east-2", "ap-south-1"] {
        assert_eq!(f.images(r).len(), 1, "{r}: one AMI");
        assert!(json(&out)["regions"][r]["image_id"].is_string(), "{r}");
    }
}

#[test]
fn throttling_is_retried() {
    if skip() {
        return;
    }
    let f = Fixture::new();
    let info = f.raw_image("throttled", &Image::sparse());
    f.double.with(|s| {
        for a in [
            "PutSnapshotBlock",
            "RegisterImage",
            "StartSnapshot",
            "DescribeImages",
        ] {
            s.faults.push(Fault {
                times: 2,
                ..Fault::new(a, FaultKind::Throttle)
            });
        }
    });
    let out = f.upload(&info, &["--run-id", "t"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("will retry"), "{out:?}");
    let throttled = f.double.calls().iter().filter(|c| c.status == 503).count();
    assert_eq!(throttled, 8);
    assert_snapshot_is(&f, REGION, &snapshot_of(&f, &out, REGION), &Image::sparse());
}

#[test]
fn one_region_failing_is_reported_with_the_regions_that_worked() {
    if skip() {
        return;
    }
    let f = Fixture::new();
    let info = f.raw_image("regions", &Image::sparse());
    f.double.with(|s| {
        s.faults.push(Fault {
            region: Some("ap-south-1".into()),
            times: u32::MAX,
            ..Fault::new(
                "CopyImage",
                FaultKind::Error {
                    status: 400,
                    code: "UnauthorizedOperation".into(),
                },
            )
        })
    });
    let out = f.upload(
        &info,
        &["--run-id", "r", "--regions", "us-east-2,ap-south-1"],
    );
    assert_eq!(out.code, 1, "{out:?}");
    let v = json(&out);
    assert!(v["regions"][REGION]["image_id"].is_string());
    assert!(v["regions"]["us-east-2"]["image_id"].is_string());
    assert!(
        v["failed"]["ap-south-1"]
            .as_str()
            .unwrap()
            .contains("UnauthorizedOperation"),
        "{v}"
    );
    assert!(out.stderr.contains("The AMI test/nixos/"), "{out:?}");
    assert!(
        out.stderr.contains("is in: eu-west-1, us-east-2"),
        "{out:?}"
    );

    // As a best-effort region, the same failure is reported, not fatal.
    let again = f.upload(
        &info,
        &[
            "--run-id",
            "r",
            "--regions",
            "us-east-2,ap-south-1",
            "--best-effort-region",
            "ap-south-1",
        ],
    );
    assert_eq!(again.code, 0, "{again:?}");
    assert!(json(&again)["best_effort_failed"]["ap-south-1"].is_string());
}

#[test]
fn dry_run_creates_nothing() {
    if skip() {
        return;
    }
    let f = Fixture::new();
    let info = f.raw_image("dry", &Image::sparse());
    let out = f.upload(
        &info,
        &[
            "--run-id",
            "d",
            "--dry-run",
            "--regions",
            "us-east-2",
            "--public",
            "--deprecate-after",
            "90d",
            "--ssm-parameter-prefix",
            "/test/amis",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let v = json(&out);
    assert_eq!(v["dry_run"], true);
    let steps = v["steps"].to_string();
    assert!(
        steps.contains("would upload") && steps.contains("would copy"),
        "{steps}"
    );
    let actions: Vec<String> = f.double.calls().iter().map(|c| c.action.clone()).collect();
    assert!(
        actions.iter().all(|a| a.starts_with("Describe")),
        "{actions:?}"
    );
    assert!(f.images(REGION).is_empty());
}

#[test]
fn sharing_deprecation_and_ssm_parameters_in_every_region() {
    if skip() {
        return;
    }
    let f = Fixture::new();
    let info = f.raw_image("shared", &Image::sparse());
    let out = f.upload(
        &info,
        &[
            "--run-id",
            "s",
            "--regions",
            "us-east-2",
            "--share-with",
            "111122223333",
            "--deprecate-after",
            "90d",
            "--ssm-parameter-prefix",
            "/test/amis",
            "--flake-revision",
            "abc123",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let v = json(&out);
    for r in [REGION, "us-east-2"] {
        let id = v["regions"][r]["image_id"].as_str().unwrap();
        let launch = f.double.calls_of("ModifyImageAttribute");
        assert!(
            launch.iter().any(|c| c.region == r
                && c.params.get("ImageId").map(String::as_str) == Some(id)
                && c.params.values().any(|p| p == "111122223333")),
            "{r}: {launch:?}"
        );
        assert!(
            f.double
                .with(|s| s.deprecations.contains_key(&(r.to_owned(), id.to_owned())))
        );
        for p in [
            "/test/amis/x86_64-linux/latest",
            "/test/amis/x86_64-linux/26.05.20261129.abcdef0",
        ] {
            let body = format!("{{\"Name\":\"{p}\"}}");
            let reply = String::from_utf8(nixos_ami_agent_tests::aws_double::ssm_get(
                &f.double, r, &body,
            ))
            .unwrap();
            assert!(reply.contains(id), "{r} {p}: {reply}");
        }
    }
    assert_eq!(v["ssm_parameters"].as_array().unwrap().len(), 2);
}

#[test]
fn prune_keeps_what_a_parameter_points_at() {
    if skip() {
        return;
    }
    let f = Fixture::new();
    let info = f.raw_image("prune", &Image::sparse());
    let common = [
        "--deprecate-after",
        "1h",
        "--ssm-parameter-prefix",
        "/test/amis",
    ];
    let old = f.upload(&info, &[&["--run-id", "old"][..], &common].concat());
    // Another build (another file) publishes the newer one.
    let info2 = f.raw_image(
        "prune2",
        &Image {
            size: 1 << 30,
            data: vec![(5, 9)],
        },
    );
    let new = f.upload(&info2, &[&["--run-id", "new"][..], &common].concat());
    assert_eq!((old.code, new.code), (0, 0), "{old:?}\n{new:?}");
    let (old_id, new_id) = (
        json(&old)["regions"][REGION]["image_id"]
            .as_str()
            .unwrap()
            .to_owned(),
        json(&new)["regions"][REGION]["image_id"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    // Both deprecated long ago.
    f.double.with(|s| {
        for id in [&old_id, &new_id] {
            s.deprecations.insert(
                (REGION.into(), id.clone()),
                "2026-01-01T00:00:00.000Z".into(),
            );
        }
    });
    let args = [
        "prune",
        "--prefix",
        "test/nixos/",
        "--regions",
        REGION,
        "--grace-period",
        "30d",
        "--json",
    ];
    let dry = f.run(&args);
    assert_eq!(dry.code, 0, "{dry:?}");
    assert_eq!(f.images(REGION).len(), 2, "nothing deleted without --yes");
    let v = json(&dry);
    let find = |v: &serde_json::Value, id: &str| {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["image_id"] == id)
            .cloned()
            .unwrap()
    };
    assert!(
        find(&v, &new_id)["kept"]
            .as_str()
            .unwrap()
            .contains("/test/amis/x86_64-linux/latest"),
        "{v}"
    );
    assert!(find(&v, &old_id)["kept"].is_null());

    let mut yes = args.to_vec();
    yes.push("--yes");
    let done = f.run(&yes);
    assert_eq!(done.code, 0, "{done:?}");
    let left: Vec<String> = f.images(REGION).into_iter().map(|(id, _)| id).collect();
    assert_eq!(
        left,
        [new_id],
        "the old AMI is gone, the one the parameter names stays"
    );
    assert_eq!(f.snapshots(REGION).len(), 1, "and the old AMI's snapshot");
}

#[test]
fn bad_input_names_the_file_or_field_and_creates_nothing() {
    if skip() {
        return;
    }
    let f = Fixture::new();
    let img = Image::sparse();
    let disk = f.path("bad.raw");
    img.write_raw(&disk);
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "missing",
            f.path("nope/nix-support/image-info.json"),
            "cannot be read",
        ),
        (
            "malformed",
            {
                let p = f.path("malformed.json");
                std::fs::write(&p, "{\"label\": ").unwrap();
                p
            },
            "not an image info file",
        ),
        (
            "size",
            f.image_info("size", &disk, img.size + 512, "x86_64-linux", "legacy-bios"),
            "`logical_bytes` says",
        ),
        (
            "system",
            f.image_info("system", &disk, img.size, "riscv64-linux", "uefi"),
            "`system`",
        ),
    ];
    for (what, info, why) in cases {
        let out = f.upload(&info, &["--run-id", "b"]);
        assert_eq!(out.code, 65, "{what}: {out:?}");
        assert!(out.stderr.contains(why), "{what}: {out:?}");
        assert!(
            out.stderr.contains(info.to_str().unwrap()),
            "{what}: names the file: {out:?}"
        );
    }
    assert!(
        f.double.calls().is_empty(),
        "nothing was asked of AWS: {:?}",
        f.double.calls()
    );

    // A name that exists, made from another image.
    let a = f.raw_image("first", &img);
    assert_eq!(f.upload(&a, &["--run-id", "same"]).code, 0);
    let b = f.raw_image(
        "second",
        &Image {
            size: 1 << 30,
            data: vec![(3, 3)],
        },
    );
    let before = f.double.calls().len();
    let out = f.upload(&b, &["--run-id", "same"]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(
        out.stderr
            .contains("exists already, made from another image"),
        "{out:?}"
    );
    let made: Vec<String> = f.double.calls()[before..]
        .iter()
        .map(|c| c.action.clone())
        .filter(|a| !a.starts_with("Describe"))
        .collect();
    assert!(made.is_empty(), "{made:?}");
}

#[test]
fn smoke_test_waits_for_the_outcome_line_and_always_terminates() {
    if skip() {
        return;
    }
    let f = Fixture::new();
    let info = f.raw_image("smoke", &Image::sparse());
    let up = f.upload(&info, &["--run-id", "smoke"]);
    assert_eq!(up.code, 0, "{up:?}");
    let id = json(&up)["regions"][REGION]["image_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let ud = f.path("ud.toml");
    std::fs::write(&ud, "#nixos-ami-agent\nflake = \"o/f/0.1#x\"\n").unwrap();
    let smoke = |extra: &[&str]| {
        let mut a = vec![
            "smoke-test",
            "--image",
            &id,
            "--region",
            REGION,
            "--poll-interval",
            "100ms",
            "--user-data",
            ud.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        f.command(&a)
    };

    // The agent's line shows up on the third look.
    f.double.with(|s| {
        s.console = Some((
            "[  OK  ] Reached target Multi-User System.\r\nnixos-ami-agent: run finished at 2026-11-29T12:00:00Z: applied (exit 0): applied o/f/0.1#x (/nix/store/x) with action switch\r\n".into(),
            2,
        ))
    });
    let out = finish(
        smoke(&["--timeout", "30s"]).spawn().unwrap(),
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("applied (exit 0)"), "{out:?}");
    assert_eq!(f.double.calls_of("TerminateInstances").len(), 1);
    let run = &f.double.calls_of("RunInstances")[0].params;
    assert_eq!(
        run.get("MetadataOptions.HttpTokens").map(String::as_str),
        Some("required"),
        "{run:?}"
    );
    assert!(run.contains_key("UserData"));

    // A failing agent fails the smoke test.
    f.double.with(|s| {
        s.console = Some(("nixos-ami-agent: run finished at 2026-11-29T12:00:00Z: failed (exit 69): IMDS disabled\n".into(), 0))
    });
    let out = finish(
        smoke(&["--timeout", "30s"]).spawn().unwrap(),
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(f.double.calls_of("TerminateInstances").len(), 2);

    // No line: a timeout, and the instance is terminated.
    f.double.with(|s| s.console = None);
    let out = finish(
        smoke(&["--timeout", "1s"]).spawn().unwrap(),
        Duration::from_secs(60),
    );
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("no outcome line"), "{out:?}");
    assert_eq!(f.double.calls_of("TerminateInstances").len(), 3);

    // Ctrl-C while waiting: terminated, then 130.
    let child = smoke(&["--timeout", "60s"]).spawn().unwrap();
    let start = Instant::now();
    while f.double.calls_of("GetConsoleOutput").len() < 30 {
        assert!(start.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: a signal to the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = finish(child, Duration::from_secs(60));
    assert_eq!(out.code, 130, "{out:?}");
    assert_eq!(f.double.calls_of("TerminateInstances").len(), 4);
}
