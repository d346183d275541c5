//! Buffer pool: released storage buffers are kept by size class and handed out again, and the
//! requests of a training step follow a plan made from the step before it.

use std::collections::BTreeMap;

/// Bytes: `in_use` that live tensors asked for, `reserved` by every buffer the pool holds (the
/// buffers of live tensors, which may be larger than asked for, and the free ones).
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryStats {
    pub in_use: u64,
    pub peak_in_use: u64,
    pub reserved: u64,
    pub peak_reserved: u64,
    pub allocations: u64,
}

pub(crate) struct Pool {
    free: BTreeMap<u64, Vec<wgpu::Buffer>>,
    stats: MemoryStats,
    /// The device's largest buffer.
    max_buffer: u64,
    step: Step,
    plan: Option<Plan>,
    plans_made: u64,
}

/// The requests of a training step (between [`Pool::begin_step`] and [`Pool::end_step`]), in
/// order, with when each was taken and released on a clock of pool events.
#[derive(Default)]
struct Step {
    /// Which step: a buffer knows the step and index of its request.
    number: u64,
    recording: bool,
    requests: Vec<Request>,
    clock: u64,
    /// Every request so far got the buffer the plan gave it.
    followed: bool,
    /// Requests are matched to plan positions (their index plus `offset`); false after a miss
    /// until the latest requests' classes are found in the plan again.
    synced: bool,
    offset: isize,
}

/// After a miss, the plan position whose predecessors have the classes of the latest requests
/// is searched within this distance of where the requests were paired before.
const RESYNC_RANGE: isize = 1024;
/// How many of the latest requests' classes a resynchronization matches.
const RESYNC_CONTEXT: usize = 8;

impl Step {
    /// Pairs request `i` (the latest) with the plan again when the classes of it and
    /// the [`RESYNC_CONTEXT`] - 1 requests before it appear in the plan's sequence in the same
    /// order, nearest the old pairing first: after requests were added or left out (a loss
    /// term that starts to contribute), later requests find their buffers again.
    fn resync(&mut self, plan: &Plan, i: usize) {
        let k = RESYNC_CONTEXT;
        if i + 1 < k {
            return;
        }
        let seq = &plan.sequence;
        let recent = |j: usize| self.requests[i - j].class;
        let matches = |p: isize| {
            p >= k as isize - 1
                && (p as usize) < seq.len()
                && (0..k).all(|j| seq[p as usize - j].0 == recent(j))
        };
        let at = i as isize + self.offset;
        for d in (0..=RESYNC_RANGE).flat_map(|d| [d, -d]) {
            if matches(at + d) {
                self.offset += d;
                self.synced = true;
                return;
            }
        }
    }
}

struct Request {
    bytes: u64,
    class: u64,
    taken: u64,
    /// None while held, and for buffers held past the step's end.
    released: Option<u64>,
}

/// Which buffer each request of a step gets, made from the previous step's requests: requests
/// whose lifetimes do not overlap share a buffer ("greedy by size": the largest request first,
/// each into the smallest buffer it fits without overlapping the others there). At the paper's
/// preset with f16 storage the size-class pool alone reserved 1.67x the step's peak in tensors
/// (its free buffers are the wrong sizes when a request comes), the plan 1.3 to 1.4x.
struct Plan {
    id: u64,
    /// The requests of the step it was made from, in order: size class and buffer (None for
    /// requests held past their step, which the size-class pool serves).
    sequence: Vec<(u64, Option<usize>)>,
    buffers: Vec<Planned>,
}

struct Planned {
    size: u64,
    slot: Slot,
}

enum Slot {
    /// Not created yet (or released by a trim).
    Unmade,
    Free(wgpu::Buffer),
    Out,
}

/// Where a buffer goes when its tensor releases it.
#[derive(Clone, Copy, Debug)]
enum Home {
    FreeList,
    Plan { plan: u64, index: usize },
}

/// The size class of a request: the next size of the form m * 2^k with m in 4..=7, so that a
/// class wastes at most a quarter of its bytes.
fn size_class(bytes: u64) -> u64 {
    if bytes <= 256 {
        return 256;
    }
    let k = 63 - bytes.leading_zeros() as u64 - 2;
    bytes.div_ceil(1 << k) << k
}

/// The largest class a request of `class` takes a buffer of: three classes up, at most 1.75x
/// the bytes. (Two classes up reserved 20% more at the paper's width with f16 storage; four or
/// more hold more in tensors.)
fn reuse_limit(class: u64) -> u64 {
    (0..3).fold(class, |c, _| size_class(c + 1))
}

/// The smallest free planned buffer of `class` up to [`reuse_limit`].
fn smallest_free(plan: &Plan, class: u64) -> Option<usize> {
    let top = reuse_limit(class);
    (0..plan.buffers.len())
        .filter(|&b| matches!(plan.buffers[b].slot, Slot::Free(_)))
        .filter(|&b| (class..=top).contains(&plan.buffers[b].size))
        .min_by_key(|&b| plan.buffers[b].size)
}

impl Pool {
    pub(crate) fn new(max_buffer: u64) -> Pool {
        Pool {
            free: BTreeMap::new(),
            stats: MemoryStats::default(),
            max_buffer,
            step: Step::default(),
            plan: None,
            plans_made: 0,
        }
    }

    /// The class of a request of `bytes`; one rounded up past the device's maximum would be
    /// refused: the exact size is not.
    fn class(&self, bytes: u64) -> u64 {
        size_class(bytes).min(self.max_buffer.max(bytes))
    }

    /// A buffer of at least `bytes`; when the device cannot create one (out of memory) the
    /// pool's free buffers are released and the creation tried once more.
    pub(crate) fn take(&mut self, device: &wgpu::Device, bytes: u64) -> Result<GpuBuffer, wgpu::Error> {
        let class = self.class(bytes);
        let request = self.step.recording.then(|| {
            let index = self.step.requests.len();
            self.step.requests.push(Request { bytes, class, taken: self.step.clock, released: None });
            self.step.clock += 1;
            (self.step.number, index)
        });
        let (buffer, home) = match self.planned(request.map(|r| r.1), bytes, class) {
            Some((index, Some(b))) => (b, self.plan_home(index)),
            Some((index, None)) => {
                let size = self.plan.as_ref().expect("a plan").buffers[index].size;
                (self.create(device, size)?, self.plan_home(index))
            }
            None => {
                let b = match self.reuse(class) {
                    Some(b) => b,
                    None => self.create(device, class)?,
                };
                (b, Home::FreeList)
            }
        };
        self.stats.in_use += bytes;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        Ok(GpuBuffer { buffer: Some(buffer), len: bytes, home, request })
    }

    fn plan_home(&self, index: usize) -> Home {
        Home::Plan { plan: self.plan.as_ref().expect("a plan").id, index }
    }

    /// The planned buffer for request `index` of the step being recorded (None: a request outside
    /// a step), marked out: its index in the plan and the buffer, or None when the buffer is
    /// still to be made. Requests are matched to the plan by position: a step repeats its
    /// predecessor's requests in order, some with other sizes (rows selected by a mask). A
    /// request that misses (its buffer is still held, or the step took another path), one made
    /// while the pairing is lost (until [`Step::resync`] finds it), and one outside a step get a
    /// free planned buffer of their size range when there is one. None when the request goes to
    /// the size-class pool.
    fn planned(
        &mut self,
        index: Option<usize>,
        bytes: u64,
        class: u64,
    ) -> Option<(usize, Option<wgpu::Buffer>)> {
        // A buffer made again for a grown request gets a quarter more than it asks: selections
        // grow a little at a time while a model learns, and each growth is an allocation.
        let grown = self.class(bytes + bytes / 4);
        let Some(plan) = self.plan.as_mut() else {
            self.step.followed = false;
            return None;
        };
        if let Some(i) = index
            && !self.step.synced
        {
            self.step.resync(plan, i);
        }
        let position = index
            .filter(|_| self.step.synced)
            .map(|i| plan.sequence.get((i as isize + self.step.offset).max(0) as usize).map(|e| e.1));
        let chosen = match position {
            // Held past its step: the size-class pool's.
            Some(Some(None)) => return None,
            // Still held by an earlier request (lifetimes changed a little): the pairing stands.
            Some(Some(Some(b))) if matches!(plan.buffers[b].slot, Slot::Out) => {
                self.step.followed = false;
                smallest_free(plan, class)?
            }
            // Grown (more rows selected than when planned): the buffer is made again, larger, and
            // the requests sharing it still never overlap. A request more than twice
            // its planned size is taken for a sign that requests were added or left out (the
            // pairing is lost until found again).
            Some(Some(Some(b))) if plan.buffers[b].size < bytes && class > 2 * plan.buffers[b].size => {
                self.step.followed = false;
                self.step.synced = false;
                smallest_free(plan, class)?
            }
            Some(Some(Some(b))) => {
                if plan.buffers[b].size < bytes {
                    if let Slot::Free(old) = std::mem::replace(&mut plan.buffers[b].slot, Slot::Unmade) {
                        self.stats.reserved -= old.size();
                    }
                    plan.buffers[b].size = grown;
                }
                b
            }
            _ => {
                if index.is_some() {
                    self.step.followed = false;
                    self.step.synced = false;
                }
                smallest_free(plan, class)?
            }
        };
        match std::mem::replace(&mut plan.buffers[chosen].slot, Slot::Out) {
            Slot::Free(b) => Some((chosen, Some(b))),
            _ => Some((chosen, None)),
        }
    }

    fn create(&mut self, device: &wgpu::Device, size: u64) -> Result<wgpu::Buffer, wgpu::Error> {
        let b = match create(device, size) {
            Ok(b) => b,
            Err(_) => {
                self.trim();
                create(device, size)?
            }
        };
        self.stats.allocations += 1;
        self.stats.reserved += size;
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
        Ok(b)
    }

    /// The smallest free buffer of `class` up to [`reuse_limit`]: tensors whose sizes vary from
    /// step to step (selected rows) then reuse what the last steps released instead of
    /// allocating, and temporaries take buffers that tensors of a slightly different size
    /// released. The tensor binds only the bytes it asked for.
    fn reuse(&mut self, class: u64) -> Option<wgpu::Buffer> {
        self.free.range_mut(class..=reuse_limit(class)).find_map(|(_, v)| v.pop())
    }

    fn give_back(&mut self, buffer: wgpu::Buffer, bytes: u64, home: Home, request: Option<(u64, usize)>) {
        self.stats.in_use -= bytes;
        if let Some((number, i)) = request
            && self.step.recording
            && number == self.step.number
        {
            self.step.requests[i].released = Some(self.step.clock);
            self.step.clock += 1;
        }
        if let Home::Plan { plan, index } = home
            && let Some(p) = self.plan.as_mut().filter(|p| p.id == plan)
        {
            p.buffers[index].slot = Slot::Free(buffer);
            return;
        }
        self.free.entry(buffer.size()).or_default().push(buffer);
    }

    /// Starts recording a training step's requests. When the last step's requests did not follow
    /// the plan (the first step, or sizes or order changed), a new plan is made from them: it
    /// takes over the free buffers that fit it, and the free buffers it does not take are
    /// released.
    pub(crate) fn begin_step(&mut self) {
        if !self.step.requests.is_empty() && (!self.step.followed || self.plan.is_none()) {
            self.replan();
        }
        self.step.number += 1;
        self.step.recording = true;
        self.step.requests.clear();
        self.step.clock = 0;
        self.step.followed = true;
        self.step.synced = true;
        self.step.offset = 0;
    }

    /// Ends the step's recording: buffers still held are held past the step.
    pub(crate) fn end_step(&mut self) {
        self.step.recording = false;
        if self.plan.as_ref().is_some_and(|p| p.sequence.len() != self.step.requests.len()) {
            self.step.followed = false;
        }
    }

    fn replan(&mut self) {
        let requests = &self.step.requests;
        let mut order: Vec<usize> = (0..requests.len()).filter(|&i| requests[i].released.is_some()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(requests[i].bytes));
        // Per planned buffer: its size and the lifetimes [taken, released) it holds.
        let mut shared: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
        let mut sequence: Vec<(u64, Option<usize>)> = requests.iter().map(|r| (r.class, None)).collect();
        for i in order {
            let (a, b) = (requests[i].taken, requests[i].released.expect("released"));
            let free = |spans: &Vec<(u64, u64)>| spans.iter().all(|&(x, y)| b <= x || a >= y);
            let fit = (0..shared.len()).filter(|&k| free(&shared[k].1)).min_by_key(|&k| shared[k].0);
            let k = fit.unwrap_or_else(|| {
                shared.push((requests[i].bytes, Vec::new()));
                shared.len() - 1
            });
            shared[k].1.push((a, b));
            sequence[i].1 = Some(k);
        }
        // The old plan's free buffers and the free list, for the new plan's buffers to take
        // over, the largest first; what none takes is released.
        let mut spare = std::mem::take(&mut self.free);
        for p in self.plan.take().into_iter().flat_map(|p| p.buffers) {
            if let Slot::Free(b) = p.slot {
                spare.entry(b.size()).or_default().push(b);
            }
        }
        let mut by_size: Vec<usize> = (0..shared.len()).collect();
        by_size.sort_by_key(|&k| std::cmp::Reverse(shared[k].0));
        let mut buffers: Vec<Planned> = shared
            .iter()
            .map(|(bytes, _)| Planned { size: self.class(*bytes), slot: Slot::Unmade })
            .collect();
        for k in by_size {
            let size = buffers[k].size;
            if let Some(b) = spare.range_mut(size..=reuse_limit(size)).find_map(|(_, v)| v.pop()) {
                buffers[k] = Planned { size: b.size(), slot: Slot::Free(b) };
            }
        }
        for (size, list) in spare {
            self.stats.reserved -= size * list.len() as u64;
        }
        self.plans_made += 1;
        self.plan = Some(Plan { id: self.plans_made, sequence, buffers });
    }

    pub(crate) fn stats(&self) -> MemoryStats {
        self.stats
    }

    /// Plans made so far (one per step whose requests changed).
    pub(crate) fn plans_made(&self) -> u64 {
        self.plans_made
    }

    /// The free buffers, (bytes, count) by size, the largest sizes first: the size-class pool's
    /// and the plan's.
    pub(crate) fn free_buffers(&self) -> Vec<(u64, usize)> {
        let mut all: BTreeMap<u64, usize> =
            self.free.iter().filter(|(_, v)| !v.is_empty()).map(|(&b, v)| (b, v.len())).collect();
        for p in self.plan.iter().flat_map(|p| &p.buffers) {
            if let Slot::Free(b) = &p.slot {
                *all.entry(b.size()).or_default() += 1;
            }
        }
        all.into_iter().rev().collect()
    }

    pub(crate) fn allocations(&self) -> u64 {
        self.stats.allocations
    }

    pub(crate) fn reset_peak(&mut self) {
        self.stats.peak_in_use = self.stats.in_use;
        self.stats.peak_reserved = self.stats.reserved;
    }

    /// Frees every pooled buffer that no tensor holds (the plan's are made again when needed).
    pub(crate) fn trim(&mut self) {
        for (class, list) in std::mem::take(&mut self.free) {
            self.stats.reserved -= class * list.len() as u64;
        }
        for p in self.plan.iter_mut().flat_map(|p| &mut p.buffers) {
            if let Slot::Free(b) = &p.slot {
                self.stats.reserved -= b.size();
                p.slot = Slot::Unmade;
            }
        }
    }
}

/// A storage buffer, with the error the device reports instead of its uncaptured-error handler.
fn create(device: &wgpu::Device, size: u64) -> Result<wgpu::Buffer, wgpu::Error> {
    let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
    let invalid = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let invalid = pollster::block_on(invalid.pop());
    match invalid.or(pollster::block_on(oom.pop())) {
        Some(e) => Err(e),
        None => Ok(buffer),
    }
}

/// A pooled storage buffer; dropping it returns it to the pool.
pub struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    /// The bytes asked for: what a whole-buffer binding covers.
    len: u64,
    home: Home,
    /// The step and index of the request that took it, while a step is recorded.
    request: Option<(u64, usize)>,
}

impl GpuBuffer {
    pub fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("buffer present until drop")
    }
    /// Capacity in bytes (a size class, at least what was asked for).
    pub fn size(&self) -> u64 {
        self.raw().size()
    }
    /// The bytes asked for (at most the capacity): a binding without a size ends here.
    pub fn bytes(&self) -> u64 {
        self.len
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        super::memtrace::release(self as *const GpuBuffer as usize);
        if let (Some(b), Some(Ok(gpu))) = (self.buffer.take(), super::GPU.get()) {
            gpu.pool.lock().unwrap().give_back(b, self.len, self.home, self.request);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_waste_at_most_a_quarter() {
        for bytes in [1u64, 255, 256, 257, 1000, 4096, 5000, 1 << 20, (1 << 20) + 1, 245 << 20] {
            let c = size_class(bytes);
            assert!(c >= bytes, "{bytes} -> {c}");
            assert!(c <= 256 || (c - bytes) * 4 <= c, "{bytes} -> {c}");
        }
        assert_eq!(size_class(1 << 20), 1 << 20);
        assert_eq!(size_class(5 << 20), 5 << 20);
    }
}
