//! The seeded random stream of the whole program: data preparation, synthesis, augmentation,
//! sampling, memory-bank draws, dropout seeds and test data.
//!
//! ChaCha8 gives a stream that is identical on every platform and crate version; the draws on
//! top of it (integers in a range, floats, normals, permutations) are written here rather than
//! taken from `rand`, so that a seed keeps producing the same data and the same training batches
//! whatever version of `rand` is around. The position in the stream is serialisable, so a run
//! can resume exactly.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng as _, SeedableRng};
use serde::{Deserialize, Serialize};

/// A seed of its own for each place that draws random numbers (a dropout site, an iteration),
/// mixed from a parent seed and a label with the SplitMix64 finalizer.
pub fn derive_seed(seed: u64, site: u64) -> u64 {
    let mut z = seed ^ site.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[derive(Clone, Debug)]
pub struct Rng {
    seed: u64,
    inner: ChaCha8Rng,
}

/// Where a [`Rng`] stands: its seed and the number of 32-bit words consumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub word_pos: u128,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self { seed, inner: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// An independent stream derived from this one's seed and a label (e.g. a case index), so
    /// that per-case draws do not depend on how many draws other cases made.
    pub fn fork(&self, label: u64) -> Self {
        let mut z = self.seed.wrapping_add(label.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // SplitMix64 finaliser: nearby labels give unrelated seeds.
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Self::new(z ^ (z >> 31))
    }

    pub fn state(&self) -> RngState {
        RngState { seed: self.seed, word_pos: self.inner.get_word_pos() }
    }

    pub fn from_state(s: RngState) -> Self {
        let mut r = Self::new(s.seed);
        r.inner.set_word_pos(s.word_pos);
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// Uniform integer in `[0, n)` (Lemire's multiply-shift with rejection, unbiased).
    /// `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform integer in `[lo, hi)`, like numpy's `randint(lo, hi)`; `lo < hi`.
    pub fn range(&mut self, lo: i64, hi: i64) -> i64 {
        assert!(lo < hi, "Rng::range({lo}, {hi}) is empty");
        lo + self.below((hi - lo) as u64) as i64
    }

    /// Uniform float in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform float in `[lo, hi)`.
    pub fn uniform_in(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Standard normal (Box-Muller; one value per call, two uniforms consumed).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A uniformly random permutation of `0..n` (Fisher-Yates).
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }

    /// Uniform f32 values in `[lo, hi)` (test data, initialization).
    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform_in(lo as f64, hi as f64) as f32).collect()
    }

    /// `k` distinct values drawn uniformly from `0..n`, in increasing order (Floyd's algorithm).
    pub fn sample_distinct(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "cannot draw {k} distinct values from {n}");
        let mut chosen = std::collections::BTreeSet::new();
        for j in n - k..n {
            let t = self.below(j as u64 + 1) as usize;
            if !chosen.insert(t) {
                chosen.insert(j);
            }
        }
        chosen.into_iter().collect()
    }

    /// A random unit vector in 3D.
    pub fn unit3(&mut self) -> [f64; 3] {
        loop {
            let v = [self.normal(), self.normal(), self.normal()];
            let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
            if n > 1e-9 {
                return [v[0] / n, v[1] / n, v[2] / n];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_state_resumes_exactly() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..10 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let _ = a.uniform();
        let s = a.state();
        let json = serde_json::to_string(&s).unwrap();
        let mut c = Rng::from_state(serde_json::from_str(&json).unwrap());
        for _ in 0..20 {
            assert_eq!(a.below(1000), c.below(1000));
        }
        assert_ne!(Rng::new(8).next_u64(), Rng::new(7).next_u64());
    }

    #[test]
    fn below_is_uniform_and_in_range() {
        let mut r = Rng::new(1);
        let mut counts = [0usize; 10];
        for _ in 0..100_000 {
            counts[r.below(10) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        for _ in 0..1000 {
            let v = r.range(10, 20);
            assert!((10..20).contains(&v));
        }
    }

    #[test]
    fn permutation_is_a_permutation_and_normal_has_unit_moments() {
        let mut r = Rng::new(3);
        let mut p = r.permutation(50);
        p.sort_unstable();
        assert_eq!(p, (0..50).collect::<Vec<_>>());
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "{mean} {var}");
    }

    #[test]
    fn forks_differ_by_label() {
        let r = Rng::new(5);
        assert_ne!(r.fork(0).next_u64(), r.fork(1).next_u64());
        assert_eq!(r.fork(3).next_u64(), Rng::new(5).fork(3).next_u64());
    }
}
