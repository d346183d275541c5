//! Activations recomputed for the backward instead of kept: BatchNorm (+ ReLU) outputs and sums,
//! dropouts and upsamplings of them give the same gradients bit for bit, and their buffers are
//! freed with the forward pass.

use std::sync::Mutex;

use caml_wgpu::autograd::{with_f16_storage, with_recompute_min};
use caml_wgpu::caml::step::train_step;
use caml_wgpu::gpu::gpu;
use caml_wgpu::gradcheck::{Rng, weighted_sum};
use caml_wgpu::nn::batchnorm::BatchNorm;
use caml_wgpu::nn::conv::Conv3d;
use caml_wgpu::ops::dropout::dropout3d;
use caml_wgpu::ops::upsample::upsample_trilinear2x;
use caml_wgpu::{Tensor, backward};

mod tiny;

/// The tests read the pool's bytes in use: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

struct Net {
    conv1: Conv3d,
    bn1: BatchNorm,
    conv2: Conv3d,
    bn2: BatchNorm,
    down: Conv3d,
    bn3: BatchNorm,
    conv4: Conv3d,
}

/// A [2, 3, 8, 8, 8] input through every recomputable kind of saved activation: a BatchNorm +
/// ReLU output read by a convolution (a), a dropout of a sum of two such outputs (d) and an
/// upsampling of one (u), each [2, 4, 8, 8, 8].
impl Net {
    fn new() -> Net {
        let mut rng = caml_wgpu::rng::Rng::new(5);
        Net {
            conv1: Conv3d::new(3, 4, 3, 1, 1, &mut rng),
            bn1: BatchNorm::new(4),
            conv2: Conv3d::new(4, 4, 3, 1, 1, &mut rng),
            bn2: BatchNorm::new(4),
            down: Conv3d::new(4, 4, 2, 2, 0, &mut rng),
            bn3: BatchNorm::new(4),
            conv4: Conv3d::new(4, 2, 3, 1, 1, &mut rng),
        }
    }

    fn params(&self) -> [&Tensor; 7] {
        [
            &self.conv1.weight,
            &self.bn1.weight,
            &self.bn1.bias,
            &self.conv2.weight,
            &self.bn2.weight,
            &self.down.weight,
            &self.conv4.weight,
        ]
    }

    fn loss(&self, x: &Tensor) -> Tensor {
        let a = self.bn1.forward_relu(&self.conv1.forward(x, true), true);
        let b = self.bn2.forward_relu(&self.conv2.forward(&a, true), true);
        let d = dropout3d(&a.add(&b), 0.5, 77, true);
        let c = self.bn3.forward_relu(&self.down.forward(&d, true), true);
        let u = upsample_trilinear2x(&c);
        weighted_sum(&self.conv4.forward(&u, true), 9)
    }
}

const SHAPE: [usize; 5] = [2, 3, 8, 8, 8];

/// The loss, the bytes in use between the forward and the backward, and the gradients of the
/// input and the parameters.
fn run(net: &Net, recompute: bool, half: bool) -> (f32, u64, Vec<Vec<f32>>) {
    let x = Tensor::variable(&Rng::new(6).vec(SHAPE.iter().product(), -1.0, 1.0), &SHAPE);
    let before = gpu().memory().in_use;
    let min = if recompute { 0 } else { usize::MAX };
    let loss = with_recompute_min(min, || with_f16_storage(half, || net.loss(&x)));
    let held = gpu().memory().in_use - before;
    let grads = backward(&loss);
    let mut all = vec![grads.get(&x).expect("input gradient").to_vec()];
    all.extend(net.params().map(|p| grads.get(p).expect("parameter gradient").to_vec()));
    (loss.item(), held, all)
}

#[test]
fn recomputed_activations_give_the_same_gradients_and_free_their_buffers() {
    let _one = SERIAL.lock().unwrap();
    let net = Net::new();
    let (loss_kept, held_kept, kept) = run(&net, false, false);
    let (loss_re, held_re, re) = run(&net, true, false);
    assert_eq!(loss_kept, loss_re);
    for (k, (a, b)) in kept.iter().zip(&re).enumerate() {
        assert!(a.iter().any(|v| *v != 0.0), "gradient {k} is zero");
        assert_eq!(a, b, "gradient {k} differs when activations are recomputed");
    }
    // a, d and u ([2, 4, 8, 8, 8] in f32 each) are not kept; every other saved tensor is.
    assert_eq!(held_kept - held_re, 3 * 2 * 4 * 512 * 4, "bytes held after the forward");
}

#[test]
fn recomputed_activations_from_f16_inputs_stay_close() {
    let _one = SERIAL.lock().unwrap();
    let net = Net::new();
    let (_, held_kept, kept) = run(&net, false, true);
    let (_, held_re, re) = run(&net, true, true);
    for (k, (a, b)) in kept.iter().zip(&re).enumerate() {
        let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
        assert!(err <= 1e-2 * scale, "gradient {k}: largest difference {err} against largest value {scale}");
    }
    // In f16 the three activations would take 2 bytes a value.
    assert_eq!(held_kept - held_re, 3 * 2 * 4 * 512 * 2, "bytes held after the forward");
}

/// Three training steps of a tiny CAML (dropout on, the memory bank filled in the first, the
/// omni-correlation loss in the others) leave every parameter and statistic the same bit for bit
/// when every activation that can be recomputed is.
#[test]
fn training_steps_are_the_same_with_activations_recomputed() {
    let _one = SERIAL.lock().unwrap();
    let cfg =
        caml_wgpu::config::TrainConfig { memory_num: 16, num_filtered: 64, dropout: 0.5, ..tiny::config() };
    let run = |min: usize| {
        let mut st = tiny::state(&cfg, 1e-4);
        for _ in 0..3 {
            with_recompute_min(min, || train_step(&mut st, &cfg, &tiny::batch(&cfg))).unwrap();
        }
        let (params, buffers) = st.model.named();
        let values = |t: &Tensor| match t.dtype() {
            caml_wgpu::DType::F32 => t.to_vec().iter().map(|v| v.to_bits()).collect(),
            caml_wgpu::DType::U32 => t.to_u32(),
        };
        params.iter().chain(&buffers).map(|(k, t)| (k.clone(), values(t))).collect::<Vec<_>>()
    };
    let (kept, re) = (run(usize::MAX), run(0));
    for ((name, a), (_, b)) in kept.iter().zip(&re) {
        assert_eq!(a, b, "{name} differs when activations are recomputed");
    }
}
