//! The memory bank of labeled embeddings (SPEC section 2, item 3). One entry per labeled case,
//! replaced whenever the case is in a batch; each entry keeps its rows grouped by class, so that
//! sampling a class needs no GPU query.

use crate::rng::Rng;
use crate::tensor::Tensor;

/// One labeled case's features: rows of class 0, then rows of class 1.
#[derive(Clone)]
pub struct BankEntry {
    pub feats: Tensor,
    pub counts: [usize; 2],
}

pub struct MemoryBank {
    pub entries: Vec<Option<BankEntry>>,
    /// Features drawn per class (`memory_num`).
    pub memory_num: usize,
}

impl MemoryBank {
    pub fn new(labeled_cases: usize, memory_num: usize) -> MemoryBank {
        MemoryBank { entries: vec![None; labeled_cases], memory_num }
    }

    /// Replaces the entry of labeled case `case` with `feats` [rows, E]: `counts[0]` rows of
    /// class 0, then `counts[1]` rows of class 1.
    pub fn update(&mut self, case: usize, feats: Tensor, counts: [usize; 2]) {
        assert_eq!(feats.dim(0), counts[0] + counts[1], "bank entry rows and class counts differ");
        self.entries[case] = Some(BankEntry { feats: feats.detach(), counts });
    }

    /// Features of class `c` held over every filled entry.
    pub fn count(&self, c: usize) -> usize {
        self.entries.iter().flatten().map(|e| e.counts[c]).sum()
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
    pub fn sample(&self, rng: &mut Rng) -> [Option<Tensor>; 2] {
        let picks = self.draw(rng);
        [0, 1].map(|c| {
            let picks = picks[c].as_ref()?;
            // Global positions (sorted) to per-entry row indices.
            let mut parts = Vec::new();
            let (mut base, mut at) = (0, 0);
            for e in self.entries.iter().flatten() {
                let n = e.counts[c];
                let first = if c == 0 { 0 } else { e.counts[0] };
                let mut rows = Vec::new();
                while at < picks.len() && picks[at] < base + n {
                    rows.push((first + picks[at] - base) as u32);
                    at += 1;
                }
                // Every filled entry takes part, drawn from or not, and the parts are always
                // joined: the step's requests for buffers do not depend on where the draws fall.
                let len = rows.len();
                parts.push(e.feats.gather_rows(&Tensor::from_u32(&rows, &[len])));
                base += n;
            }
            Some(Tensor::concat(&parts, 0))
        })
    }
}
