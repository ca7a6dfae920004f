//! Model test: random sequences of write / punch / resize / commit /
//! snapshot / rollback / clone / delete-snapshot / gc — and, with the
//! fault-injecting backend, failing fsyncs, full disks, torn writes and
//! crashes — checked after every step against plain byte arrays.
//!
//! Size with `GEOSYNC_PROPTEST_CASES` (default 24 cases per backend).

use geosync_fs::backend::{FaultPacks, FaultPlan, MemPacks};
use geosync_fs::{ImageHandle, InitOptions, OpenMode, SealJob, Store};
use geosync_suite::model::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

enum Backend {
    Disk,
    Fault(FaultPacks<MemPacks>),
}

struct Sut {
    dir: tempfile::TempDir,
    backend: Backend,
    store: Option<Store>,
    handles: Vec<Option<ImageHandle>>,
    model: Vec<Option<ModelImage>>,
    snaps: usize,
    /// Seal jobs taken and not run yet, with how many byte-changing steps
    /// they have waited (so two can be outstanding on one image).
    jobs: Vec<(SealJob, u8)>,
}

impl Drop for Sut {
    fn drop(&mut self) {
        // Before the handles, which wait for their jobs.
        self.run_jobs(0);
    }
}

fn opts() -> InitOptions {
    InitOptions {
        block_size: BS as u32,
        compression: "zstd:1".parse().unwrap(),
    }
}

impl Sut {
    fn new(faults: bool) -> Sut {
        let dir = tempfile::tempdir().unwrap();
        let backend = if faults {
            let f = FaultPacks::new(MemPacks::new());
            Store::init_with(&dir.path().join("meta.db"), Box::new(f.clone()), &opts()).unwrap();
            Backend::Fault(f)
        } else {
            Store::init(dir.path(), &opts()).unwrap();
            Backend::Disk
        };
        let mut s = Sut {
            dir,
            backend,
            store: None,
            handles: (0..SLOTS).map(|_| None).collect(),
            model: vec![None; SLOTS],
            snaps: 0,
            jobs: Vec::new(),
        };
        s.reopen();
        s
    }

    fn store(&self) -> &Store {
        self.store.as_ref().unwrap()
    }

    fn open_handle(&self, i: usize) -> ImageHandle {
        let mut h = self.store().open_image(&slot_name(i)).unwrap();
        h.set_dirty_limit(2 * BS as usize); // exercise sealing before commit
        h
    }

    fn reopen(&mut self) {
        self.handles.iter_mut().for_each(|h| *h = None);
        self.store = None;
        let store = match &self.backend {
            Backend::Disk => Store::open(self.dir.path(), OpenMode::ReadWrite).unwrap(),
            Backend::Fault(f) => Store::open_with(
                &self.dir.path().join("meta.db"),
                Box::new(f.clone()),
                OpenMode::ReadWrite,
            )
            .unwrap(),
        };
        self.store = Some(store);
        for i in 0..SLOTS {
            if let Some(m) = &mut self.model[i] {
                m.current = m.committed.clone();
                self.handles[i] = Some(self.open_handle(i));
            }
        }
    }

    fn commit(&mut self, i: usize) {
        if let (Some(h), Some(m)) = (&mut self.handles[i], &mut self.model[i]) {
            h.commit().unwrap();
            m.committed = m.current.clone();
        }
    }

    fn commit_all(&mut self) {
        for i in 0..SLOTS {
            self.commit(i);
        }
    }

    /// Run the jobs that waited at least `age` steps, oldest first.
    fn run_jobs(&mut self, age: u8) {
        let (run, keep) = std::mem::take(&mut self.jobs)
            .into_iter()
            .partition(|(_, a)| *a >= age);
        self.jobs = keep;
        for (j, _) in run {
            j.run();
        }
    }

    fn apply(&mut self, op: &Op) {
        // Jobs stay outstanding over steps that only change bytes (which may
        // overwrite what a job holds) or take another job, and run after the
        // second such step; every other step waits for jobs, so they run first.
        let overlaps = matches!(
            op,
            Op::Write { .. } | Op::Punch { .. } | Op::Resize { .. } | Op::SealJob { .. }
        );
        if !overlaps {
            self.run_jobs(0);
        }
        self.apply_op(op);
        if overlaps && !matches!(op, Op::SealJob { .. }) {
            for (_, a) in &mut self.jobs {
                *a += 1;
            }
            self.run_jobs(2);
        }
    }

    fn apply_op(&mut self, op: &Op) {
        match *op {
            Op::Write {
                img,
                offset,
                len,
                fill,
            } => {
                if self.model[img].is_none() {
                    self.store().create_image(&slot_name(img), 0).unwrap();
                    self.model[img] = Some(ModelImage::default());
                    self.handles[img] = Some(self.open_handle(img));
                }
                let bytes = fill.bytes(len);
                self.handles[img].as_mut().unwrap().write(offset, &bytes).unwrap();
                model_write(&mut self.model[img].as_mut().unwrap().current, offset, &bytes);
            }
            Op::Punch { img, offset, len } => {
                if let Some(m) = &mut self.model[img] {
                    self.handles[img].as_mut().unwrap().punch(offset, len).unwrap();
                    model_punch(&mut m.current, offset, len);
                }
            }
            Op::Resize { img, size } => {
                if let Some(m) = &mut self.model[img] {
                    self.handles[img].as_mut().unwrap().set_size(size).unwrap();
                    m.current.resize(size as usize, 0);
                }
            }
            Op::ShareBlocks {
                src,
                dst,
                from,
                to,
                n,
            } => {
                if self.model[src].is_some() && self.model[dst].is_some() {
                    let sources = self.handles[src]
                        .as_ref()
                        .unwrap()
                        .block_sources(from..from + n)
                        .unwrap();
                    let end = (to + n) * BS;
                    self.handles[dst]
                        .as_mut()
                        .unwrap()
                        .put_blocks(to, sources, end)
                        .unwrap();
                    let mut bytes = self.model[src].as_ref().unwrap().current.clone();
                    bytes.resize(((from + n) * BS).max(bytes.len() as u64) as usize, 0);
                    let chunk = bytes[(from * BS) as usize..((from + n) * BS) as usize].to_vec();
                    let m = self.model[dst].as_mut().unwrap();
                    if m.current.len() < end as usize {
                        m.current.resize(end as usize, 0);
                    }
                    m.current[(to * BS) as usize..end as usize].copy_from_slice(&chunk);
                }
            }
            Op::Commit { img } => self.commit(img),
            Op::Snapshot { img } => {
                if self.model[img].is_some() {
                    self.commit(img);
                    self.snaps += 1;
                    let name = format!("s{}", self.snaps);
                    self.store().create_snapshot(&slot_name(img), &name).unwrap();
                    let m = self.model[img].as_mut().unwrap();
                    m.snapshots.push((name, m.committed.clone()));
                }
            }
            Op::Rollback { img, which } => {
                if self.model[img].as_ref().is_some_and(|m| !m.snapshots.is_empty()) {
                    self.commit(img);
                    let m = self.model[img].as_mut().unwrap();
                    let (name, data) = m.snapshots[which % m.snapshots.len()].clone();
                    m.committed = data.clone();
                    m.current = data;
                    // An image open for writing cannot be rolled back: close it first.
                    self.handles[img] = None;
                    self.store().rollback(&slot_name(img), &name).unwrap();
                    self.handles[img] = Some(self.open_handle(img));
                }
            }
            Op::Clone { src, dst } => {
                if src != dst && self.model[src].is_some() && self.model[dst].is_none() {
                    self.commit(src);
                    self.store()
                        .clone_image(&slot_name(src), None, &slot_name(dst))
                        .unwrap();
                    let data = self.model[src].as_ref().unwrap().committed.clone();
                    self.model[dst] = Some(ModelImage {
                        committed: data.clone(),
                        current: data,
                        snapshots: vec![],
                    });
                    self.handles[dst] = Some(self.open_handle(dst));
                }
            }
            Op::DeleteSnapshot { img, which } => {
                if self.model[img].as_ref().is_some_and(|m| !m.snapshots.is_empty()) {
                    self.commit(img);
                    let m = self.model[img].as_mut().unwrap();
                    let (name, _) = m.snapshots.remove(which % m.snapshots.len());
                    self.store().delete_snapshot(&slot_name(img), &name).unwrap();
                }
            }
            Op::Gc => {
                self.commit_all();
                self.store().gc(false).unwrap();
            }
            Op::FaultyCommit { img, kind, at } => {
                let Backend::Fault(f) = &self.backend else {
                    return;
                };
                let f = f.clone();
                if self.model[img].is_none() {
                    return;
                }
                // Other images commit first: a failed fsync poisons the shared pack.
                for i in (0..SLOTS).filter(|&i| i != img) {
                    self.commit(i);
                }
                let at = at as u64;
                f.set_plan(match kind {
                    0 => FaultPlan {
                        fail_sync_at: Some(at),
                        ..Default::default()
                    },
                    1 => FaultPlan {
                        enospc_after_bytes: Some(at << 10),
                        ..Default::default()
                    },
                    _ => FaultPlan {
                        short_write_at: Some(at),
                        ..Default::default()
                    },
                });
                let r = self.handles[img].as_mut().unwrap().commit();
                f.set_plan(FaultPlan::default());
                let m = self.model[img].as_mut().unwrap();
                match r {
                    Ok(_) => m.committed = m.current.clone(),
                    Err(e) => {
                        if kind == 1 {
                            assert!(matches!(e, geosync_fs::Error::NoSpace(_)), "{e}");
                        }
                        m.current = m.committed.clone();
                    }
                }
            }
            Op::SealJob { img } => {
                if let Some(h) = &mut self.handles[img] {
                    if let Some(j) = h.seal_job(0).unwrap() {
                        self.jobs.push((j, 0));
                    }
                }
            }
            Op::Crash => {
                if let Backend::Fault(f) = &self.backend {
                    let f = f.clone();
                    self.handles.iter_mut().for_each(|h| *h = None);
                    self.store = None;
                    f.crash();
                }
                self.reopen();
            }
        }
    }

    fn check(&self) -> Result<(), TestCaseError> {
        for i in 0..SLOTS {
            let Some(m) = &self.model[i] else { continue };
            let h = self.handles[i].as_ref().unwrap();
            prop_assert_eq!(h.size(), m.current.len() as u64, "size of {}", slot_name(i));
            let mut buf = vec![0xAAu8; m.current.len()];
            h.read(0, &mut buf).unwrap();
            prop_assert!(
                buf == m.current,
                "contents of {} differ from the model",
                slot_name(i)
            );
            let size = m.current.len() as u64;
            for b in 0..=size.div_ceil(BS) {
                for off in [b * BS, b * BS + 1, b * BS + BS - 1] {
                    prop_assert_eq!(
                        h.seek_data(off).unwrap(),
                        m.seek_data(off),
                        "SEEK_DATA {} of {}",
                        off,
                        slot_name(i)
                    );
                    prop_assert_eq!(
                        h.seek_hole(off).unwrap(),
                        m.seek_hole(off),
                        "SEEK_HOLE {} of {}",
                        off,
                        slot_name(i)
                    );
                }
            }
            let data_blocks = (0..size.div_ceil(BS))
                .filter(|&b| block_is_data(&m.current, b))
                .count() as u64;
            prop_assert_eq!(
                h.allocated_bytes().unwrap(),
                data_blocks * BS,
                "allocation of {}",
                slot_name(i)
            );
            // The committed version, through a fresh handle.
            let fresh = self.store().open_image(&slot_name(i)).unwrap();
            prop_assert_eq!(fresh.size(), m.committed.len() as u64);
            let mut buf = vec![0xAAu8; m.committed.len()];
            fresh.read(0, &mut buf).unwrap();
            prop_assert!(
                buf == m.committed,
                "committed contents of {} differ",
                slot_name(i)
            );
        }
        Ok(())
    }

    /// End of a case: snapshots hold what they pinned, diffs are exact, and
    /// scrub finds nothing wrong.
    fn check_final(&mut self) -> Result<(), TestCaseError> {
        self.run_jobs(0);
        self.commit_all();
        let store = self.store().clone();
        for i in 0..SLOTS {
            let Some(m) = self.model[i].clone() else {
                continue;
            };
            for (name, data) in &m.snapshots {
                store.clone_image(&slot_name(i), Some(name), "check").unwrap();
                let h = store.open_image("check").unwrap();
                let mut buf = vec![0xAAu8; data.len()];
                prop_assert_eq!(h.size(), data.len() as u64);
                h.read(0, &mut buf).unwrap();
                prop_assert!(&buf == data, "snapshot {} of {} differs", name, slot_name(i));
                drop(h);
                store.remove_image("check").unwrap();
                // The read-only snapshot view reads the same, holes included.
                let view = store.open_snapshot(&slot_name(i), name).unwrap();
                let mut buf = vec![0xAAu8; data.len()];
                view.read(0, &mut buf).unwrap();
                prop_assert!(&buf == data, "snapshot view {} of {} differs", name, slot_name(i));
                let snap_model = ModelImage {
                    current: data.clone(),
                    ..Default::default()
                };
                for b in 0..=(data.len() as u64).div_ceil(BS) {
                    prop_assert_eq!(view.seek_data(b * BS).unwrap(), snap_model.seek_data(b * BS));
                    prop_assert_eq!(view.seek_hole(b * BS).unwrap(), snap_model.seek_hole(b * BS));
                }
                let mut view = view;
                prop_assert!(matches!(view.write(0, b"x"), Err(geosync_fs::Error::ReadOnly(_))));

                let d = store.diff(&slot_name(i), name, "head").unwrap();
                let got: Vec<u64> = d.changed.iter().flat_map(|r| r.clone()).collect();
                let nb = (data.len().max(m.committed.len()) as u64).div_ceil(BS);
                let block = |v: &Vec<u8>, b: u64| {
                    let mut out = vec![0u8; BS as usize];
                    let s = ((b * BS) as usize).min(v.len());
                    let e = (((b + 1) * BS) as usize).min(v.len());
                    out[..e - s].copy_from_slice(&v[s..e]);
                    out
                };
                let want: Vec<u64> = (0..nb)
                    .filter(|&b| block(data, b) != block(&m.committed, b))
                    .collect();
                prop_assert_eq!(got, want, "diff {}..head of {}", name, slot_name(i));
            }
        }
        let r = store.scrub(&|_| {}).unwrap();
        prop_assert!(r.damaged.is_empty(), "scrub found damage: {:?}", r.damaged);
        Ok(())
    }
}

fn run(faults: bool) {
    let mut runner = TestRunner::new(Config {
        cases: cases(24),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&prop::collection::vec(op(faults), 1..60), |ops| {
            let mut sut = Sut::new(faults);
            for op in &ops {
                sut.apply(op);
                sut.check()?;
            }
            sut.check_final()
        })
        .unwrap();
}

#[test]
fn model_disk_store() {
    run(false);
}

#[test]
fn model_fault_injecting_store() {
    run(true);
}
