//! Buffer pool: released storage buffers are kept by size class and handed out again, and the
//! requests of a training step follow a plan made from the step before it.
//!
//! With `CAML_POOL_TRACE=FILE` the pool writes its events (requests, releases, step marks) to
//! FILE; [`replay`] runs such a trace through a pool of host-side stand-ins for buffers, so that
//! the pool's policies can be measured on a step too large for this machine's device.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use anyhow::{Context, Result, bail};

/// What the pool needs to know of a buffer.
pub(crate) trait PoolBuffer {
    fn capacity(&self) -> u64;
}

impl PoolBuffer for wgpu::Buffer {
    fn capacity(&self) -> u64 {
        self.size()
    }
}

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

pub(crate) struct Pool<B: PoolBuffer = wgpu::Buffer> {
    /// Free buffers by size, each with the step in which it came back.
    free: BTreeMap<u64, Vec<(B, u64)>>,
    stats: MemoryStats,
    /// The device's largest buffer.
    max_buffer: u64,
    step: Step,
    plan: Option<Plan<B>>,
    plans_made: u64,
    /// Where the events go, with `CAML_POOL_TRACE`.
    trace: Option<std::io::BufWriter<std::fs::File>>,
    /// The trace's name for the next request.
    next_id: u64,
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
    fn resync<B>(&mut self, plan: &Plan<B>, i: usize) {
        let k = RESYNC_CONTEXT;
        if i + 1 < k {
            return;
        }
        let seq = &plan.sequence;
        let recent = |j: usize| self.requests[i - j].class;
        let matches = |p: isize| {
            p >= k as isize - 1
                && (p as usize) < seq.len()
                && (0..k).all(|j| seq[p as usize - j].class == recent(j))
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
    class: u64,
    taken: u64,
    /// None while held, and for buffers held past the step's end.
    released: Option<u64>,
    /// The most bytes asked for by it and by the requests at its plan position in the steps
    /// before: planned buffers are sized for these, so that a selection whose size goes up and
    /// down from step to step stops making buffers once it has been at its largest.
    high: u64,
    /// Its size class differed from its predecessors' at its plan position in some step before:
    /// a selection's rows. Such a request more than twice its planned buffer's size is taken for
    /// a selection that grew, not for a sign that the pairing is lost.
    varies: bool,
}

/// Which buffer each request of a step gets, made from the previous step's requests: requests
/// whose lifetimes do not overlap share a buffer ("greedy by size": the largest request first,
/// each into the smallest buffer it fits without overlapping the others there). At the paper's
/// preset with f16 storage the size-class pool alone reserved 1.67x the step's peak in tensors
/// (its free buffers are the wrong sizes when a request comes), the plan 1.3 to 1.4x.
struct Plan<B> {
    id: u64,
    /// The requests of the step it was made from, in order.
    sequence: Vec<Position>,
    buffers: Vec<Planned<B>>,
}

struct Position {
    class: u64,
    /// None for a request held past its step, which the size-class pool serves.
    buffer: Option<usize>,
    /// [`Request::high`] and [`Request::varies`] of the request it was made from.
    high: u64,
    varies: bool,
}

struct Planned<B> {
    size: u64,
    slot: Slot<B>,
}

enum Slot<B> {
    /// Not created yet (or released by a trim).
    Unmade,
    Free(B),
    Out,
}

/// Where a request's buffer comes from ([`Pool::planned`]).
enum Source<B> {
    /// Planned buffer `index`: free, or still to be made (None).
    Plan(usize, Option<B>),
    /// The size-class pool, with room to grow: the plan's step held this request past its end.
    Held,
    /// The size-class pool.
    FreeList,
}

/// A buffer the pool handed out, and what it needs to know when the buffer comes back.
struct Taken<B> {
    buffer: B,
    home: Home,
    /// The step and index of the request it answers, while a step is recorded.
    request: Option<(u64, usize)>,
    /// Its name in the trace.
    id: u64,
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
/// more hold more in tensors.) A request of at most [`SMALL`] takes any buffer up to
/// [`SMALL_BUFFER`]: a step whose requests changed (a loss term that starts or stops, a count
/// that grows) then finds its small buffers among the free ones instead of making new ones.
fn reuse_limit(class: u64) -> u64 {
    let up = (0..3).fold(class, |c, _| size_class(c + 1));
    if class <= SMALL { up.max(SMALL_BUFFER) } else { up }
}

/// The largest buffer a request of `class` held past its step takes: 4 times its class, or
/// [`reuse_limit`]. Such values (a memory bank's entries) are replaced each step by one of
/// another size, so the last step's buffer, released later in the step, must stay in range.
fn held_limit(class: u64) -> u64 {
    (4 * class).max(reuse_limit(class))
}

/// Requests up to this many bytes are small: see [`reuse_limit`].
const SMALL: u64 = 16 << 10;
/// The size a small request's planned buffer is made again at when it outgrows it, and the
/// largest free buffer a small request takes.
const SMALL_BUFFER: u64 = 64 << 10;

/// The smallest free planned buffer of `class` up to `top` bytes ([`reuse_limit`] within a
/// step).
fn smallest_free<B>(plan: &Plan<B>, class: u64, top: u64) -> Option<usize> {
    (0..plan.buffers.len())
        .filter(|&b| matches!(plan.buffers[b].slot, Slot::Free(_)))
        .filter(|&b| (class..=top).contains(&plan.buffers[b].size))
        .min_by_key(|&b| plan.buffers[b].size)
}

impl Pool<wgpu::Buffer> {
    /// The device's pool; it traces its events to the file `CAML_POOL_TRACE` names, if any.
    pub(crate) fn new(max_buffer: u64) -> Result<Pool> {
        let mut pool = Pool::untraced(max_buffer);
        if let Some(path) = std::env::var_os("CAML_POOL_TRACE") {
            let file = std::fs::File::create(&path)
                .with_context(|| format!("cannot create the pool trace {}", path.display()))?;
            let mut w = std::io::BufWriter::new(file);
            let _ = writeln!(w, "max_buffer {max_buffer}");
            pool.trace = Some(w);
        }
        Ok(pool)
    }

    /// A buffer of at least `bytes`; when the device cannot create one (out of memory) the
    /// pool's free buffers are released and the creation tried once more.
    pub(crate) fn take(&mut self, device: &wgpu::Device, bytes: u64) -> Result<GpuBuffer, wgpu::Error> {
        let t = self.take_with(bytes, &mut |size| create(device, size))?;
        Ok(GpuBuffer { buffer: Some(t.buffer), len: bytes, home: t.home, request: t.request, id: t.id })
    }
}

impl<B: PoolBuffer> Pool<B> {
    fn untraced(max_buffer: u64) -> Pool<B> {
        Pool {
            free: BTreeMap::new(),
            stats: MemoryStats::default(),
            max_buffer,
            step: Step::default(),
            plan: None,
            plans_made: 0,
            trace: None,
            next_id: 0,
        }
    }

    fn event(&mut self, line: std::fmt::Arguments) {
        if let Some(w) = self.trace.as_mut() {
            let _ = w.write_fmt(line).and_then(|_| w.write_all(b"\n"));
        }
    }

    /// The class of a request of `bytes`; one rounded up past the device's maximum would be
    /// refused: the exact size is not.
    fn class(&self, bytes: u64) -> u64 {
        size_class(bytes).min(self.max_buffer.max(bytes))
    }

    /// A buffer of at least `bytes`, made by `create` or reused.
    fn take_with(
        &mut self,
        bytes: u64,
        create: &mut dyn FnMut(u64) -> Result<B, wgpu::Error>,
    ) -> Result<Taken<B>, wgpu::Error> {
        let id = self.next_id;
        self.next_id += 1;
        self.event(format_args!("t {id} {bytes}"));
        let class = self.class(bytes);
        let request = self.step.recording.then(|| {
            let index = self.step.requests.len();
            self.step.requests.push(Request {
                class,
                taken: self.step.clock,
                released: None,
                high: bytes,
                varies: false,
            });
            self.step.clock += 1;
            (self.step.number, index)
        });
        let (buffer, home) = match self.planned(request.map(|r| r.1), bytes, class) {
            Source::Plan(index, Some(b)) => (b, self.plan_home(index)),
            Source::Plan(index, None) => {
                let size = self.plan.as_ref().expect("a plan").buffers[index].size;
                (self.create(create, size)?, self.plan_home(index))
            }
            Source::Held => (self.take_held(create, bytes, class)?, Home::FreeList),
            Source::FreeList => {
                let b = match self.reuse(class) {
                    Some(b) => b,
                    None => {
                        self.shed();
                        self.create(create, class)?
                    }
                };
                (b, Home::FreeList)
            }
        };
        self.stats.in_use += bytes;
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.stats.in_use);
        Ok(Taken { buffer, home, request, id })
    }

    fn plan_home(&self, index: usize) -> Home {
        Home::Plan { plan: self.plan.as_ref().expect("a plan").id, index }
    }

    /// The planned buffer for request `index` of the step being recorded (None: a request outside
    /// a step), marked out: its index in the plan and the buffer, or None when the buffer is
    /// still to be made; or the size-class pool. Requests are matched to the plan by position: a step repeats its
    /// predecessor's requests in order, some with other sizes (rows selected by a mask). A
    /// request that misses (its buffer is still held, or the step took another path) and one made
    /// while the pairing is lost (until [`Step::resync`] finds it) get a free planned buffer of
    /// their size range when there is one, else the size-class pool; so does a request that the
    /// plan's step held past its end ([`Source::Held`]). One outside a step gets the smallest
    /// free planned buffer that holds it, of any size.
    fn planned(&mut self, index: Option<usize>, bytes: u64, class: u64) -> Source<B> {
        // A buffer made again for a grown request gets a quarter more than it asks (a small one
        // SMALL_BUFFER): selections grow a little at a time while a model learns, and each
        // growth is an allocation.
        let grown = if bytes <= SMALL { SMALL_BUFFER } else { self.class(bytes + bytes / 4) };
        let Some(plan) = self.plan.as_mut() else {
            self.step.followed = false;
            return Source::FreeList;
        };
        if let Some(i) = index
            && !self.step.synced
        {
            self.step.resync(plan, i);
        }
        let at =
            index.filter(|_| self.step.synced).map(|i| (i, (i as isize + self.step.offset).max(0) as usize));
        // The high-water mark passes on unless the sizes say the pairing is off.
        let varies = at.and_then(|(_, p)| plan.sequence.get(p)).is_some_and(|e| e.varies);
        if let Some((i, p)) = at
            && let Some(e) = plan.sequence.get(p)
        {
            let r = &mut self.step.requests[i];
            r.varies = e.varies || e.class != class;
            if varies || (e.class <= 2 * class && class <= 2 * e.class) {
                r.high = r.high.max(e.high);
            }
        }
        let position = at.map(|(_, p)| plan.sequence.get(p).map(|e| e.buffer));
        let chosen = match position {
            // Held past its step: the size-class pool's.
            Some(Some(None)) => return Source::Held,
            // Still held by an earlier request (lifetimes changed a little): the pairing stands.
            Some(Some(Some(b))) if matches!(plan.buffers[b].slot, Slot::Out) => {
                self.step.followed = false;
                smallest_free(plan, class, reuse_limit(class))
            }
            // Grown (more rows selected than when planned): the buffer is made again, larger, and
            // the requests sharing it still never overlap; the next step follows a new plan,
            // made for the new sizes (buffers shared by requests that grow at different times
            // would otherwise keep growing to each one's largest size). A request more than twice
            // its planned size, at a position whose size never varied, is taken for a sign that
            // requests were added or left out (the pairing is lost until found again); a wrong
            // pairing at a varying position still shows in the step's request count at its end.
            Some(Some(Some(b)))
                if !varies && plan.buffers[b].size < bytes && class > 2 * plan.buffers[b].size =>
            {
                self.step.followed = false;
                self.step.synced = false;
                smallest_free(plan, class, reuse_limit(class))
            }
            Some(Some(Some(b))) => {
                if plan.buffers[b].size < bytes {
                    if let Slot::Free(old) = std::mem::replace(&mut plan.buffers[b].slot, Slot::Unmade) {
                        self.stats.reserved -= old.capacity();
                    }
                    plan.buffers[b].size = grown;
                    self.step.followed = false;
                }
                Some(b)
            }
            // Outside a step (validation between steps, say) every planned buffer is free: the
            // smallest that holds the request, of any size, so that such work creates none.
            _ if index.is_none() => smallest_free(plan, class, u64::MAX),
            _ => {
                self.step.followed = false;
                self.step.synced = false;
                smallest_free(plan, class, reuse_limit(class))
            }
        };
        let Some(chosen) = chosen else { return Source::FreeList };
        match std::mem::replace(&mut plan.buffers[chosen].slot, Slot::Out) {
            Slot::Free(b) => Source::Plan(chosen, Some(b)),
            _ => Source::Plan(chosen, None),
        }
    }

    fn create(
        &mut self,
        create: &mut dyn FnMut(u64) -> Result<B, wgpu::Error>,
        size: u64,
    ) -> Result<B, wgpu::Error> {
        let b = match create(size) {
            Ok(b) => b,
            Err(_) => {
                self.trim();
                create(size)?
            }
        };
        self.stats.allocations += 1;
        self.stats.reserved += size;
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.stats.reserved);
        Ok(b)
    }

    /// Releases free buffers, the largest first, while they hold more than a 32nd of the bytes
    /// in use: called before a buffer is made, so that buffers of sizes no request takes do
    /// not pile up in a step without a plan (the first step at the paper's preset reserved
    /// 10493 MiB for 7249 MiB of tensors without it, 7923 MiB with it, at the cost of 7% more
    /// buffers made in that step).
    fn shed(&mut self) {
        let limit = self.stats.in_use / 32;
        let mut idle: u64 = self.free.iter().map(|(size, v)| size * v.len() as u64).sum();
        while idle > limit {
            let Some(list) = self.free.values_mut().rev().find(|v| !v.is_empty()) else { break };
            let (b, _) = list.pop().expect("a free buffer");
            self.stats.reserved -= b.capacity();
            idle -= b.capacity();
        }
    }

    /// A buffer for a request of the kind the plan's step held past its end (values carried to
    /// the next step, whose sizes vary with the selections they come from): the smallest free
    /// buffer of up to 4 times its class or [`reuse_limit`] (the last step's, which its holder
    /// released), else a new one with half as many bytes again to grow into.
    fn take_held(
        &mut self,
        create: &mut dyn FnMut(u64) -> Result<B, wgpu::Error>,
        bytes: u64,
        class: u64,
    ) -> Result<B, wgpu::Error> {
        if let Some((b, _)) = self.free.range_mut(class..=held_limit(class)).find_map(|(_, v)| v.pop()) {
            return Ok(b);
        }
        self.shed();
        let size = self.class(bytes + bytes / 2);
        self.create(create, size)
    }

    /// The smallest free buffer of `class` up to [`reuse_limit`]: tensors whose sizes vary from
    /// step to step (selected rows) then reuse what the last steps released instead of
    /// allocating, and temporaries take buffers that tensors of a slightly different size
    /// released. The tensor binds only the bytes it asked for.
    fn reuse(&mut self, class: u64) -> Option<B> {
        self.free.range_mut(class..=reuse_limit(class)).find_map(|(_, v)| v.pop()).map(|(b, _)| b)
    }

    fn give_back(&mut self, buffer: B, bytes: u64, home: Home, request: Option<(u64, usize)>, id: u64) {
        self.event(format_args!("r {id}"));
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
        self.free.entry(buffer.capacity()).or_default().push((buffer, self.step.number));
    }

    /// Starts recording a training step's requests. When the last step's requests did not follow
    /// the plan (the first step, or sizes or order changed, or a request outgrew its buffer), a
    /// new plan is made from them: it takes over the free buffers that fit it, one free buffer
    /// is kept for each request held past the step, and the others are released. Free buffers
    /// that no request took in the whole last step are released too (in a run, misses and
    /// selections of new sizes left 80 MiB of them beside the small preset's 200 MiB of tensors).
    pub(crate) fn begin_step(&mut self) {
        self.event(format_args!("b"));
        let last = self.step.number;
        for (size, list) in self.free.iter_mut() {
            let before = list.len();
            list.retain(|&(_, step)| step >= last);
            self.stats.reserved -= size * (before - list.len()) as u64;
        }
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
        self.event(format_args!("e"));
        if let Some(w) = self.trace.as_mut() {
            let _ = w.flush();
        }
        self.step.recording = false;
        if self.plan.as_ref().is_some_and(|p| p.sequence.len() != self.step.requests.len()) {
            self.step.followed = false;
        }
    }

    fn replan(&mut self) {
        let requests = &self.step.requests;
        let mut order: Vec<usize> = (0..requests.len()).filter(|&i| requests[i].released.is_some()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(requests[i].high));
        // Per planned buffer: its size and the lifetimes [taken, released) it holds.
        let mut shared: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
        let mut sequence: Vec<Position> = requests
            .iter()
            .map(|r| Position { class: r.class, buffer: None, high: r.high, varies: r.varies })
            .collect();
        for i in order {
            let (a, b) = (requests[i].taken, requests[i].released.expect("released"));
            let free = |spans: &Vec<(u64, u64)>| spans.iter().all(|&(x, y)| b <= x || a >= y);
            let fit = (0..shared.len()).filter(|&k| free(&shared[k].1)).min_by_key(|&k| shared[k].0);
            let k = fit.unwrap_or_else(|| {
                shared.push((requests[i].high, Vec::new()));
                shared.len() - 1
            });
            shared[k].1.push((a, b));
            sequence[i].buffer = Some(k);
        }
        // The old plan's free buffers and the free list, for the new plan's buffers to take
        // over, the largest first; what none takes is released.
        let mut spare: BTreeMap<u64, Vec<B>> = std::mem::take(&mut self.free)
            .into_iter()
            .map(|(size, v)| (size, v.into_iter().map(|(b, _)| b).collect()))
            .collect();
        for p in self.plan.take().into_iter().flat_map(|p| p.buffers) {
            if let Slot::Free(b) = p.slot {
                spare.entry(b.capacity()).or_default().push(b);
            }
        }
        let mut by_size: Vec<usize> = (0..shared.len()).collect();
        by_size.sort_by_key(|&k| std::cmp::Reverse(shared[k].0));
        let mut buffers: Vec<Planned<B>> = shared
            .iter()
            .map(|(bytes, _)| Planned { size: self.class(*bytes), slot: Slot::Unmade })
            .collect();
        for k in by_size {
            let size = buffers[k].size;
            if let Some(b) = spare.range_mut(size..=reuse_limit(size)).find_map(|(_, v)| v.pop()) {
                buffers[k] = Planned { size: b.capacity(), slot: Slot::Free(b) };
            }
        }
        // The requests held past the step are replaced in the next one by values of other sizes
        // (selections): for each, the largest free buffer from half its class to its
        // [`held_limit`] stays free.
        for r in self.step.requests.iter().filter(|r| r.released.is_none()) {
            if let Some(b) =
                spare.range_mut(r.class / 2..=held_limit(r.class)).rev().find_map(|(_, v)| v.pop())
            {
                self.free.entry(b.capacity()).or_default().push((b, self.step.number));
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
                *all.entry(b.capacity()).or_default() += 1;
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
        self.event(format_args!("x"));
        for (class, list) in std::mem::take(&mut self.free) {
            self.stats.reserved -= class * list.len() as u64;
        }
        for p in self.plan.iter_mut().flat_map(|p| &mut p.buffers) {
            if let Slot::Free(b) = &p.slot {
                self.stats.reserved -= b.capacity();
                p.slot = Slot::Unmade;
            }
        }
    }
}

/// A replayed trace: the peaks over all of it, and per step (from one step mark to the next; the
/// first step also holds what came before it).
pub struct Replay {
    pub total: MemoryStats,
    pub steps: Vec<MemoryStats>,
    pub plans_made: u64,
}

/// A host-side stand-in for a buffer of the given capacity.
struct StandIn(u64);

impl PoolBuffer for StandIn {
    fn capacity(&self) -> u64 {
        self.0
    }
}

/// Runs a trace written with `CAML_POOL_TRACE` through a fresh pool whose buffers are
/// host-side stand-ins: what the pool would reserve for the same requests. The trace is written
/// out at each step's end, so a process's last events may be cut short: a last line without its
/// newline is left out.
pub fn replay(path: &std::path::Path) -> Result<Replay> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    let mut lines = whole.lines().enumerate();
    let bad = |n: usize, what: &str| anyhow::anyhow!("{}, line {}: {what}", path.display(), n + 1);
    let max_buffer = match lines.next() {
        Some((n, l)) => l
            .strip_prefix("max_buffer ")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(n, "expected `max_buffer BYTES`, the first line of a pool trace"))?,
        None => bail!("{} is empty, not a pool trace", path.display()),
    };
    let mut pool = Pool::<StandIn>::untraced(max_buffer);
    let mut held: HashMap<u64, (Taken<StandIn>, u64)> = HashMap::new();
    let mut steps = Vec::new();
    let mut step_allocations = 0;
    let mut close_step = |pool: &mut Pool<StandIn>, steps: &mut Vec<MemoryStats>| {
        let mut s = pool.stats();
        s.allocations -= step_allocations;
        step_allocations = pool.stats().allocations;
        steps.push(s);
        pool.reset_peak();
    };
    let mut started = false;
    for (n, line) in lines {
        let mut words = line.split_whitespace();
        let event = words.next();
        let mut number =
            || words.next().and_then(|w| w.parse::<u64>().ok()).ok_or_else(|| bad(n, "bad number"));
        match event {
            Some("t") => {
                let (id, bytes) = (number()?, number()?);
                let t = pool
                    .take_with(bytes, &mut |size| Ok(StandIn(size)))
                    .map_err(|e| bad(n, &e.to_string()))?;
                held.insert(id, (t, bytes));
            }
            Some("r") => {
                let id = number()?;
                let (t, bytes) =
                    held.remove(&id).ok_or_else(|| bad(n, "releases a buffer the trace never took"))?;
                pool.give_back(t.buffer, bytes, t.home, t.request, t.id);
            }
            Some("b") => {
                if started {
                    close_step(&mut pool, &mut steps);
                }
                started = true;
                pool.begin_step();
            }
            Some("e") => pool.end_step(),
            Some("x") => pool.trim(),
            _ => return Err(bad(n, "unknown event")),
        }
    }
    close_step(&mut pool, &mut steps);
    let mut total = pool.stats();
    total.peak_in_use = steps.iter().map(|s| s.peak_in_use).max().unwrap_or(0);
    total.peak_reserved = steps.iter().map(|s| s.peak_reserved).max().unwrap_or(0);
    Ok(Replay { total, steps, plans_made: pool.plans_made() })
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
    /// Its name in the pool's trace.
    id: u64,
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
            gpu.pool.lock().unwrap().give_back(b, self.len, self.home, self.request, self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Pool, SMALL, SMALL_BUFFER, StandIn, Taken, reuse_limit, size_class};

    const MIB: u64 = 1 << 20;

    fn take(pool: &mut Pool<StandIn>, bytes: u64) -> (Taken<StandIn>, u64) {
        (pool.take_with(bytes, &mut |size| Ok(StandIn(size))).unwrap(), bytes)
    }

    fn give(pool: &mut Pool<StandIn>, (t, bytes): (Taken<StandIn>, u64)) {
        pool.give_back(t.buffer, bytes, t.home, t.request, t.id);
    }

    #[test]
    fn free_buffers_of_sizes_no_request_takes_are_released_before_a_buffer_is_made() {
        let mut pool = Pool::untraced(u64::MAX);
        let (a, b) = (take(&mut pool, 4 * MIB), take(&mut pool, 4 * MIB));
        give(&mut pool, a);
        give(&mut pool, b);
        assert_eq!(pool.stats().reserved, 8 * MIB);
        // Nothing in use: the two free 4 MiB buffers go before the 16 MiB one is made.
        let c = take(&mut pool, 16 * MIB);
        assert_eq!(pool.stats().reserved, 16 * MIB);
        assert_eq!(pool.stats().peak_reserved, 16 * MIB);
        // A free buffer that fits is taken, not released.
        give(&mut pool, c);
        let d = take(&mut pool, 15 * MIB);
        assert_eq!((pool.stats().reserved, pool.stats().allocations), (16 * MIB, 3));
        give(&mut pool, d);
    }

    /// A step of two requests, 128 MiB and 1 MiB.
    fn step(pool: &mut Pool<StandIn>) {
        pool.begin_step();
        let big = take(pool, 128 * MIB);
        let small = take(pool, MIB);
        give(pool, small);
        give(pool, big);
        pool.end_step();
    }

    #[test]
    fn a_free_buffer_no_request_took_for_a_whole_step_is_released() {
        let mut pool = Pool::untraced(u64::MAX);
        for _ in 0..3 {
            step(&mut pool);
        }
        let (planned, allocations) = (pool.stats().reserved, pool.stats().allocations);
        // Made between steps, larger than every planned buffer: a buffer of its own, then free.
        let spare = take(&mut pool, 160 * MIB);
        give(&mut pool, spare);
        assert_eq!(pool.stats().reserved, planned + 160 * MIB);
        step(&mut pool);
        // Still free after the step that began after it came back...
        assert_eq!(pool.stats().reserved, planned + 160 * MIB);
        step(&mut pool);
        // ... and released once a whole step went by without it.
        assert_eq!(pool.stats().reserved, planned);
        for _ in 0..3 {
            step(&mut pool);
        }
        assert_eq!((pool.stats().reserved, pool.stats().allocations), (planned, allocations + 1));
    }

    #[test]
    fn work_between_steps_takes_the_plans_free_buffers() {
        let mut pool = Pool::untraced(u64::MAX);
        for _ in 0..3 {
            step(&mut pool);
        }
        let (reserved, allocations) = (pool.stats().reserved, pool.stats().allocations);
        // Between steps (validation, say) requests of sizes no step asks for take the planned
        // buffers that hold them, however much larger, and the steps after keep their plan.
        let a = take(&mut pool, 3 * MIB);
        let b = take(&mut pool, 512 * 1024);
        give(&mut pool, a);
        give(&mut pool, b);
        for _ in 0..2 {
            step(&mut pool);
        }
        assert_eq!((pool.stats().reserved, pool.stats().allocations), (reserved, allocations));
    }

    /// Runs `body(pool, s)` as the steps s = 0..steps: the buffers made in each.
    fn made_per_step(
        pool: &mut Pool<StandIn>,
        steps: u64,
        mut body: impl FnMut(&mut Pool<StandIn>, u64),
    ) -> Vec<u64> {
        (0..steps)
            .map(|s| {
                let before = pool.stats().allocations;
                pool.begin_step();
                body(pool, s);
                pool.end_step();
                pool.stats().allocations - before
            })
            .collect()
    }

    /// Steps of two requests alive at once, of `sizes` (MiB) each: the allocations each step made.
    fn allocations_per_step(pool: &mut Pool<StandIn>, steps: &[[u64; 2]]) -> Vec<u64> {
        made_per_step(pool, steps.len() as u64, |pool, s| {
            let [a, b] = steps[s as usize].map(|mib| take(pool, mib * MIB));
            give(pool, a);
            give(pool, b);
        })
    }

    #[test]
    fn a_request_whose_size_goes_up_and_down_stops_making_buffers() {
        // The first request alternates between 4 and 7 MiB; the second grows in step 3, so the
        // plan of step 4 comes from a step in which the first asked for 4 MiB: it plans for the
        // 7 MiB seen before at that position.
        let mut pool = Pool::untraced(u64::MAX);
        let steps = [[4, 1], [7, 1], [4, 2], [7, 1], [4, 2], [7, 1], [4, 2], [7, 1]];
        let made = allocations_per_step(&mut pool, &steps);
        assert_eq!(made[3..], [0; 5], "allocations per step: {made:?}");
    }

    #[test]
    fn a_request_held_past_its_step_reuses_its_predecessors_buffer() {
        // A value made in one step and released in the next (the selections a step hands to the
        // next), of a size that changes from step to step.
        let mut pool = Pool::untraced(u64::MAX);
        let mut held = None;
        let sizes = [4, 6, 3, 5, 6, 4, 5, 3];
        let made = made_per_step(&mut pool, sizes.len() as u64, |pool, s| {
            let x = take(pool, MIB);
            let next = take(pool, sizes[s as usize] * MIB);
            if let Some(h) = held.replace(next) {
                give(pool, h);
            }
            give(pool, x);
        });
        // The value alternates between two buffers: each grows once, to half as much again as
        // the request that made it, and then serves every size up to that.
        assert!(made[1..].iter().sum::<u64>() <= 2 && made[5..] == [0; 3], "allocations per step: {made:?}");
        // Two buffers with room for half as much again as the largest held value (a 10 MiB
        // class), besides the step's own.
        assert_eq!(pool.stats().peak_reserved, 21 * MIB, "{:?}", pool.stats());
    }

    #[test]
    fn a_small_request_that_keeps_growing_stops_making_buffers() {
        // A count-sized request between large ones grows by 500 bytes a step: its planned buffer
        // is made again once, at SMALL_BUFFER, and holds every later size (with a quarter more
        // each time, it was made again in steps 2, 6 and 10).
        let mut pool = Pool::untraced(u64::MAX);
        let made = made_per_step(&mut pool, 12, |pool, s| {
            let big = take(pool, 8 * MIB);
            let count = take(pool, 4000 + 500 * s);
            let other = take(pool, 2 * MIB);
            for t in [count, other, big] {
                give(pool, t);
            }
        });
        assert_eq!(made[2..], [0; 10], "allocations per step: {made:?}");
        // A small request takes any free buffer up to SMALL_BUFFER, a large one up to 1.75x.
        assert_eq!((reuse_limit(1024), reuse_limit(SMALL)), (SMALL_BUFFER, SMALL_BUFFER));
        assert_eq!(reuse_limit(MIB), 7 * MIB / 4);
    }

    #[test]
    fn a_selection_whose_size_jumps_keeps_the_pairing() {
        // A selection swings between 1 and 5 MiB from step to step, and each step makes a new
        // plan, so that the 5 MiB is more than twice its planned buffer. Once its position is
        // known to vary, the swing is a growth, not a sign that requests were added or left
        // out: the requests after it stay paired with the plan (taken for a lost pairing, each
        // swing left them to find free buffers of their sizes until the classes of 8 requests
        // in a row matched the plan again; a paper-preset trace replayed made 39 buffers after
        // its second step with that, 19 without).
        let mut pool = Pool::untraced(u64::MAX);
        let mut paired = Vec::new();
        let made = made_per_step(&mut pool, 12, |pool, s| {
            let first = take(pool, 8 * MIB);
            let selection = take(pool, [MIB, 5 * MIB][s as usize % 2]);
            paired.push(pool.step.synced);
            for k in [6, 2, 7, 3, 9, 4, 10, 11, 12, 13] {
                let t = take(pool, k * MIB);
                give(pool, t);
            }
            give(pool, selection);
            give(pool, first);
            // A last request in every other step (it takes the temporaries' buffer): each step
            // makes a new plan.
            if s % 2 == 1 {
                let t = take(pool, 13 * MIB);
                give(pool, t);
            }
        });
        assert!(paired[2..].iter().all(|&p| p), "paired after the selection, per step: {paired:?}");
        assert_eq!(made[3..], [0; 9], "allocations per step: {made:?}");
    }

    #[test]
    fn a_value_held_past_its_step_finds_its_predecessors_buffer_after_a_new_plan() {
        // A value carried to the next step (a memory bank's entry) is replaced in each step by
        // one of another size, the old released after the new is made, while the other requests
        // change every step (a new plan each time). The plan keeps a free buffer for the held
        // value from half its class to 4 times it, the largest: the next value may be larger or
        // smaller (kept from its class to 1.75 times it, the 30 MiB buffer made for a 20 MiB
        // value was released whenever an 8 MiB value was held, and made again in the next step).
        let mut pool = Pool::untraced(u64::MAX);
        let mut held = None;
        let made = made_per_step(&mut pool, 12, |pool, s| {
            let value = take(pool, [20 * MIB, 8 * MIB][s as usize % 2]);
            if let Some(old) = held.replace(value) {
                give(pool, old);
            }
            for _ in 0..1 + s % 2 {
                let t = take(pool, 2 * MIB);
                give(pool, t);
            }
        });
        assert_eq!(made[3..], [0; 9], "allocations per step: {made:?}");
    }

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
