//! Batch sampling for semi-supervised training, as the reference's `TwoStreamBatchSampler`.
//!
//! Indices refer to the train list: the first `labelnum` are labeled, the rest unlabeled. An
//! epoch draws a fresh permutation of the labeled indices and walks it in groups of
//! `labeled_bs` (a remainder smaller than a group is dropped, as `zip` over the grouper drops
//! it); each epoch also starts a fresh endless chain of unlabeled permutations, read
//! `unlabeled_bs` at a time (a group may span two permutations). The labeled permutation is
//! drawn when the epoch starts, each unlabeled permutation when it is first needed.
//!
//! The sampler's whole state, including its random stream, serialises to JSON through
//! [`Sampler::state`] / [`Sampler::from_state`], so a resumed run sees the same batches.

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::data::augment;
use crate::data::dataset::Case;
use crate::rng::{Rng, RngState};

/// The reference's 2 labeled + 2 unlabeled batch.
pub const LABELED_BS: usize = 2;
pub const UNLABELED_BS: usize = 2;

#[derive(Clone, Debug)]
pub struct Sampler {
    s: SamplerState,
    rng: Rng,
    aug_rng: Rng,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SamplerState {
    pub n_train: usize,
    pub labelnum: usize,
    pub labeled_bs: usize,
    pub unlabeled_bs: usize,
    /// Completed epochs.
    pub epoch: u64,
    /// Batches handed out in total.
    pub batches: u64,
    labeled_perm: Vec<usize>,
    labeled_pos: usize,
    unlabeled_perm: Vec<usize>,
    unlabeled_pos: usize,
    rng: RngState,
    aug_rng: RngState,
}

/// Indices into the train list for one iteration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchIndices {
    pub labeled: Vec<usize>,
    pub unlabeled: Vec<usize>,
}

impl BatchIndices {
    /// Labeled first, then unlabeled: the order of the samples in the batch tensor.
    pub fn all(&self) -> Vec<usize> {
        self.labeled.iter().chain(&self.unlabeled).copied().collect()
    }
}

/// One augmented batch, laid out (N, 1, X, Y, Z) row-major, labeled samples first.
#[derive(Clone, Debug)]
pub struct Batch {
    pub indices: BatchIndices,
    pub patch: [usize; 3],
    pub images: Vec<f32>,
    /// Labels of every sample (those of unlabeled samples are for diagnostics only).
    pub labels: Vec<u8>,
}

impl Sampler {
    /// `seed` drives both the index stream and the augmentation stream (derived streams).
    pub fn new(
        n_train: usize,
        labelnum: usize,
        labeled_bs: usize,
        unlabeled_bs: usize,
        seed: u64,
    ) -> Result<Self> {
        ensure!(
            labeled_bs > 0 && labelnum >= labeled_bs,
            "{labelnum} labeled cases cannot fill a labeled batch of {labeled_bs}"
        );
        ensure!(labelnum <= n_train, "labelnum {labelnum} exceeds the {n_train} training cases");
        ensure!(
            n_train - labelnum >= unlabeled_bs,
            "{} unlabeled cases cannot fill an unlabeled batch of {unlabeled_bs}",
            n_train - labelnum
        );
        let root = Rng::new(seed);
        let rng = root.fork(0);
        let aug_rng = root.fork(1);
        Ok(Self {
            s: SamplerState {
                n_train,
                labelnum,
                labeled_bs,
                unlabeled_bs,
                epoch: 0,
                batches: 0,
                labeled_perm: Vec::new(),
                labeled_pos: 0,
                unlabeled_perm: Vec::new(),
                unlabeled_pos: 0,
                rng: rng.state(),
                aug_rng: aug_rng.state(),
            },
            rng,
            aug_rng,
        })
    }

    /// Batches per epoch (`labelnum // labeled_bs`).
    pub fn batches_per_epoch(&self) -> usize {
        self.s.labelnum / self.s.labeled_bs
    }

    pub fn epoch(&self) -> u64 {
        self.s.epoch
    }

    pub fn next_indices(&mut self) -> BatchIndices {
        let s = &mut self.s;
        if s.labeled_perm.is_empty() || s.labeled_pos + s.labeled_bs > s.labeled_perm.len() {
            if !s.labeled_perm.is_empty() {
                // Counters restored from a file may be anything.
                s.epoch = s.epoch.saturating_add(1);
            }
            s.labeled_perm = self.rng.permutation(s.labelnum);
            s.labeled_pos = 0;
            s.unlabeled_perm.clear();
            s.unlabeled_pos = 0;
        }
        let labeled = s.labeled_perm[s.labeled_pos..s.labeled_pos + s.labeled_bs].to_vec();
        s.labeled_pos += s.labeled_bs;
        let n_unl = s.n_train - s.labelnum;
        let mut unlabeled = Vec::with_capacity(s.unlabeled_bs);
        while unlabeled.len() < s.unlabeled_bs {
            if s.unlabeled_pos == s.unlabeled_perm.len() {
                s.unlabeled_perm = self.rng.permutation(n_unl);
                s.unlabeled_pos = 0;
            }
            unlabeled.push(s.labelnum + s.unlabeled_perm[s.unlabeled_pos]);
            s.unlabeled_pos += 1;
        }
        s.batches = s.batches.saturating_add(1);
        BatchIndices { labeled, unlabeled }
    }

    /// The next batch, augmented and cropped to `patch`. `cases` is the train list in order.
    /// With `intensity`, each sample's patch also gets an [`augment::IntensityParams`] change,
    /// drawn from the augmentation stream after its crop.
    pub fn next_batch(&mut self, cases: &[Case], patch: [usize; 3], intensity: bool) -> Result<Batch> {
        ensure!(
            cases.len() == self.s.n_train,
            "the sampler was built for {} training cases, got {}",
            self.s.n_train,
            cases.len()
        );
        let indices = self.next_indices();
        let all = indices.all();
        let n: usize = patch.iter().product();
        let mut images = Vec::with_capacity(all.len() * n);
        let mut labels = Vec::with_capacity(all.len() * n);
        for &i in &all {
            let c = &cases[i];
            let (mut img, lab) = augment::augment(&c.image, &c.label, patch, &mut self.aug_rng);
            if intensity {
                augment::IntensityParams::draw(&mut self.aug_rng).apply(&mut img, &mut self.aug_rng);
            }
            images.extend_from_slice(&img);
            labels.extend_from_slice(&lab);
        }
        Ok(Batch { indices, patch, images, labels })
    }

    pub fn state(&self) -> SamplerState {
        let mut s = self.s.clone();
        s.rng = self.rng.state();
        s.aug_rng = self.aug_rng.state();
        s
    }

    pub fn from_state(s: SamplerState) -> Result<Self> {
        // In this order, so that n_train - labelnum cannot underflow.
        ensure!(
            s.labeled_bs > 0
                && s.labelnum >= s.labeled_bs
                && s.labelnum <= s.n_train
                && s.unlabeled_bs <= s.n_train - s.labelnum
                && (s.labeled_perm.is_empty() || s.labeled_perm.len() == s.labelnum)
                && (s.unlabeled_perm.is_empty() || s.unlabeled_perm.len() == s.n_train - s.labelnum)
                && s.labeled_pos <= s.labeled_perm.len()
                && s.unlabeled_pos <= s.unlabeled_perm.len()
                && s.labeled_perm.iter().all(|&i| i < s.labelnum)
                && s.unlabeled_perm.iter().all(|&i| i < s.n_train - s.labelnum),
            "inconsistent sampler state ({} training cases, {} labeled, batches of {} labeled and {} \
             unlabeled, permutations of {} and {} at {} and {})",
            s.n_train,
            s.labelnum,
            s.labeled_bs,
            s.unlabeled_bs,
            s.labeled_perm.len(),
            s.unlabeled_perm.len(),
            s.labeled_pos,
            s.unlabeled_pos
        );
        Ok(Self { rng: Rng::from_state(s.rng), aug_rng: Rng::from_state(s.aug_rng), s })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.state()).expect("the sampler state serialises")
    }

    pub fn from_json(json: &str) -> Result<Self> {
        let s: SamplerState = serde_json::from_str(json).context("parsing the sampler state")?;
        Self::from_state(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Volume;

    #[test]
    fn epochs_walk_labeled_permutations_in_pairs() {
        let mut s = Sampler::new(80, 9, 2, 2, 1337).unwrap();
        assert_eq!(s.batches_per_epoch(), 4);
        for epoch in 0..5 {
            let mut seen = Vec::new();
            for _ in 0..4 {
                let b = s.next_indices();
                assert_eq!(b.labeled.len(), 2);
                assert!(b.labeled.iter().all(|&i| i < 9));
                assert!(b.unlabeled.iter().all(|&i| (9..80).contains(&i)));
                seen.extend(b.labeled);
            }
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), 8, "epoch {epoch}: 8 distinct of the 9 labeled");
            assert_eq!(s.epoch(), epoch);
        }
    }

    #[test]
    fn unlabeled_stream_restarts_each_epoch_and_spans_permutations() {
        // 4 labeled -> 2 batches per epoch; 3 unlabeled drawn 2 at a time: the second batch
        // takes the last of one permutation and the first of the next.
        let mut s = Sampler::new(7, 4, 2, 2, 5).unwrap();
        let a = s.next_indices();
        let b = s.next_indices();
        let mut first: Vec<usize> = a.unlabeled.clone();
        first.push(b.unlabeled[0]);
        first.sort_unstable();
        assert_eq!(first, vec![4, 5, 6], "one whole permutation");
        // A new epoch starts a new chain: 2 of a fresh permutation, distinct.
        let c = s.next_indices();
        assert_eq!(s.epoch(), 1);
        assert_ne!(c.unlabeled[0], c.unlabeled[1]);
    }

    fn ramp_cases() -> Vec<Case> {
        (0..6)
            .map(|i| Case {
                name: format!("c{i}"),
                image: Volume::from_fn([10, 9, 8], |x, y, z| (i * 1000 + x * 100 + y * 10 + z) as f32),
                label: Volume::from_fn([10, 9, 8], |x, _, _| (x > 4) as u8),
            })
            .collect()
    }

    #[test]
    fn state_round_trip_resumes_identically() {
        let cases = ramp_cases();
        for intensity in [false, true] {
            let mut a = Sampler::new(6, 3, 2, 2, 42).unwrap();
            for _ in 0..5 {
                a.next_batch(&cases, [4, 4, 4], intensity).unwrap();
            }
            let mut b = Sampler::from_json(&a.to_json()).unwrap();
            for _ in 0..7 {
                let x = a.next_batch(&cases, [4, 4, 4], intensity).unwrap();
                let y = b.next_batch(&cases, [4, 4, 4], intensity).unwrap();
                assert_eq!(x.indices, y.indices);
                assert_eq!(x.images, y.images);
                assert_eq!(x.labels, y.labels);
                assert_eq!(x.images.len(), 4 * 64);
            }
        }
        // The same seed gives the same batches from the start; another seed does not.
        let mut c = Sampler::new(6, 3, 2, 2, 42).unwrap();
        let mut d = Sampler::new(6, 3, 2, 2, 43).unwrap();
        let mut e = Sampler::new(6, 3, 2, 2, 42).unwrap();
        let seq = |s: &mut Sampler| (0..6).map(|_| s.next_indices().all()).collect::<Vec<_>>();
        let (sc, sd, se) = (seq(&mut c), seq(&mut d), seq(&mut e));
        assert_eq!(sc, se);
        assert_ne!(sc, sd);
    }

    #[test]
    fn intensity_changes_images_only() {
        let cases = ramp_cases();
        let mut a = Sampler::new(6, 3, 2, 2, 42).unwrap();
        let mut b = Sampler::new(6, 3, 2, 2, 42).unwrap();
        // The first batch crops the same patches (the intensity draws follow each crop's).
        let x = a.next_batch(&cases, [4, 4, 4], false).unwrap();
        let y = b.next_batch(&cases, [4, 4, 4], true).unwrap();
        assert_eq!(x.indices, y.indices);
        let n = 64;
        assert_eq!(x.labels[..n], y.labels[..n]);
        assert_ne!(x.images[..n], y.images[..n]);
    }

    #[test]
    fn impossible_configurations_are_errors() {
        assert!(Sampler::new(80, 1, 2, 2, 0).is_err());
        assert!(Sampler::new(4, 3, 2, 2, 0).is_err());
        assert!(Sampler::new(4, 8, 2, 2, 0).is_err());
        assert!(Sampler::new(4, 4, 4, 0, 0).is_ok());
        assert!(Sampler::from_json("{}").is_err());
        // A saved state whose unlabeled batch cannot be filled would index an empty permutation.
        let mut st = Sampler::new(4, 2, 1, 2, 0).unwrap().state();
        st.unlabeled_bs = 3;
        assert!(Sampler::from_state(st).is_err());
    }
}
