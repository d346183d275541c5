use crate::gpu::Gpu;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_a: Args) -> anyhow::Result<()> {
    let g = Gpu::init()?;
    let i = &g.info;
    let l = &g.limits;
    println!("adapter:      {}", i.name);
    println!("backend:      {:?}", i.backend);
    println!("device type:  {:?}{}", i.device_type, if g.is_software() { " (software)" } else { "" });
    println!("driver:       {} {}", i.driver, i.driver_info);
    println!("vendor/device: {:#06x}/{:#06x}", i.vendor, i.device);
    println!("limits:");
    println!("  max_buffer_size                     {}", l.max_buffer_size);
    println!("  max_storage_buffer_binding_size     {}", l.max_storage_buffer_binding_size);
    println!("  max_uniform_buffer_binding_size     {}", l.max_uniform_buffer_binding_size);
    println!("  max_storage_buffers_per_shader_stage {}", l.max_storage_buffers_per_shader_stage);
    println!("  max_compute_workgroup_storage_size  {}", l.max_compute_workgroup_storage_size);
    println!("  max_compute_invocations_per_workgroup {}", l.max_compute_invocations_per_workgroup);
    println!(
        "  max_compute_workgroup_size          {} x {} x {}",
        l.max_compute_workgroup_size_x, l.max_compute_workgroup_size_y, l.max_compute_workgroup_size_z
    );
    println!("  max_compute_workgroups_per_dimension {}", l.max_compute_workgroups_per_dimension);
    println!("  min_storage_buffer_offset_alignment {}", l.min_storage_buffer_offset_alignment);
    println!("features:");
    for (name, f) in [
        ("SHADER_F16", wgpu::Features::SHADER_F16),
        ("TIMESTAMP_QUERY", wgpu::Features::TIMESTAMP_QUERY),
        ("SUBGROUP", wgpu::Features::SUBGROUP),
        ("PIPELINE_CACHE", wgpu::Features::PIPELINE_CACHE),
    ] {
        println!("  {name:<16} {}", if g.features.contains(f) { "yes" } else { "no" });
    }
    match g.pipeline_cache() {
        Some(c) if c.loaded_bytes > 0 => {
            println!("pipeline cache: {} ({} bytes loaded)", c.path.display(), c.loaded_bytes)
        }
        Some(c) => println!("pipeline cache: {} (empty so far)", c.path.display()),
        None => println!("pipeline cache: off (CAML_PIPELINE_CACHE, or no PIPELINE_CACHE feature)"),
    }
    Ok(())
}
