use clap::Parser;

fn main() {
    // Mesa's Vulkan drivers complain on every start when this is unset, though compute needs none.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // SAFETY: single-threaded here, before anything reads the environment.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    let cli = caml_wgpu::cli::Cli::parse();
    if let Err(e) = caml_wgpu::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
