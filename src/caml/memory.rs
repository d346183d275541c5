//! The memory bank of labeled embeddings (SPEC section 2, item 3). One entry per labeled case,
//! replaced whenever the case is in a batch; each entry keeps its rows grouped by class, so that
//! sampling a class needs no GPU query.
//!
//! Each case's entry lives in a buffer of its own made with the bank, with room for the most
//! rows an entry can have (a patch's voxels): replacing an entry copies the new rows in, and the
//! bank's memory is the same from the first iteration to the last.

use crate::gpu::gpu;
use crate::rng::Rng;
use crate::tensor::Tensor;

pub struct MemoryBank {
    /// Per labeled case: room for `capacity` rows of `embed` features; an entry's rows (class 0,
    /// then class 1) from the first on.
    store: Vec<Tensor>,
    /// Per labeled case: its rows of class 0 and of class 1, once filled.
    counts: Vec<Option<[usize; 2]>>,
    capacity: usize,
    embed: usize,
    /// Features drawn per class (`memory_num`).
    pub memory_num: usize,
}

/// Which entries are filled and how: what a rehearsed step changes, restored after it.
#[derive(Clone)]
pub struct BankCounts(Vec<Option<[usize; 2]>>);

impl MemoryBank {
    /// An empty bank for `labeled_cases` cases, each entry with room for `capacity` rows of
    /// `embed` features (made now).
    pub fn new(labeled_cases: usize, memory_num: usize, capacity: usize, embed: usize) -> MemoryBank {
        let store = if capacity == 0 {
            Vec::new()
        } else {
            (0..labeled_cases).map(|_| Tensor::zeros(&[capacity, embed])).collect()
        };
        MemoryBank { store, counts: vec![None; labeled_cases], capacity, embed, memory_num }
    }

    /// The number of labeled cases.
    pub fn cases(&self) -> usize {
        self.counts.len()
    }

    /// The most rows an entry holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Replaces the entry of labeled case `case` with the first rows of `feats` [rows, E]:
    /// `counts[0]` rows of class 0, then `counts[1]` rows of class 1.
    pub fn update(&mut self, case: usize, feats: Tensor, counts: [usize; 2]) {
        let rows = counts[0] + counts[1];
        assert!(feats.dim(0) >= rows, "a bank entry of {rows} rows from {} rows", feats.dim(0));
        assert!(rows <= self.capacity, "a bank entry of {rows} rows, room for {}", self.capacity);
        assert!(
            feats.rank() == 2 && feats.dim(1) == self.embed && feats.dtype() == crate::DType::F32,
            "bank entry of shape {:?}, [rows, {}] f32 expected",
            feats.shape(),
            self.embed
        );
        gpu().copy(feats.buffer(), 0, self.store[case].buffer(), 0, (rows * self.embed * 4) as u64);
        self.counts[case] = Some(counts);
    }

    /// The rows of case `case`'s entry and its class counts, if it was filled (a copy).
    pub fn entry(&self, case: usize) -> Option<(Tensor, [usize; 2])> {
        let counts = self.counts[case]?;
        let rows = Tensor::empty(&[counts[0] + counts[1], self.embed]);
        gpu().copy(self.store[case].buffer(), 0, rows.buffer(), 0, rows.bytes());
        Some((rows, counts))
    }

    /// Which entries are filled, with how many rows of each class.
    pub fn counts(&self) -> BankCounts {
        BankCounts(self.counts.clone())
    }

    /// Sets which entries are filled back to `counts` (from [`MemoryBank::counts`] of this bank,
    /// whose rows have not been written since: a rehearsed step writes none).
    pub fn restore_counts(&mut self, counts: BankCounts) {
        assert_eq!(counts.0.len(), self.counts.len(), "bank counts of another bank");
        self.counts = counts.0;
    }

    /// Features of class `c` held over every filled entry.
    pub fn count(&self, c: usize) -> usize {
        self.counts.iter().flatten().map(|e| e[c]).sum()
    }

    /// Per class, the positions of `memory_num` features drawn uniformly without replacement
    /// from every filled entry's rows of that class (counted over the entries in order, each
    /// entry's rows of the class in their order), sorted; `None` where the bank holds fewer.
    pub fn draw(&self, rng: &mut Rng) -> [Option<Vec<usize>>; 2] {
        [0, 1].map(|c| {
            let total = self.count(c);
            (total >= self.memory_num && self.memory_num > 0)
                .then(|| rng.sample_distinct(total, self.memory_num))
        })
    }

    /// Per class, the features at the positions [`MemoryBank::draw`] draws; `None` where the
    /// bank holds fewer than `memory_num`.
    ///
    /// Every entry, filled or not, is read with an index of `memory_num` rows per class (its
    /// draws, then row 0 repeated), and its drawn rows are copied into the class's memory: the
    /// step's buffers have the same sizes wherever the draws fall.
    pub fn sample(&self, rng: &mut Rng) -> [Option<Tensor>; 2] {
        let picks = self.draw(rng);
        let (m, e) = (self.memory_num, self.embed);
        if m == 0 {
            return [None, None];
        }
        let memory = [Tensor::empty(&[m, e]), Tensor::empty(&[m, e])];
        // Per class: the next draw, the entries' rows of the class before this entry, the rows
        // written to its memory.
        let (mut next, mut base, mut written) = ([0; 2], [0; 2], [0; 2]);
        for (store, counts) in self.store.iter().zip(&self.counts) {
            let counts = counts.unwrap_or([0, 0]);
            let mut index = vec![0u32; 2 * m];
            let mut taken = [0; 2];
            for c in 0..2 {
                let Some(p) = &picks[c] else { continue };
                let first = if c == 0 { 0 } else { counts[0] };
                while next[c] < p.len() && p[next[c]] < base[c] + counts[c] {
                    index[c * m + taken[c]] = (first + p[next[c]] - base[c]) as u32;
                    taken[c] += 1;
                    next[c] += 1;
                }
                base[c] += counts[c];
            }
            let rows = store.gather_rows(&Tensor::from_u32(&index, &[2 * m]));
            let row = (e * 4) as u64;
            for c in 0..2 {
                let at = (c * m) as u64 * row;
                gpu().copy(
                    rows.buffer(),
                    at,
                    memory[c].buffer(),
                    written[c] as u64 * row,
                    taken[c] as u64 * row,
                );
                written[c] += taken[c];
            }
        }
        let [m0, m1] = memory;
        [picks[0].is_some().then_some(m0), picks[1].is_some().then_some(m1)]
    }
}
