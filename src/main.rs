use clap::Parser;

fn main() {
    // Mesa's Vulkan drivers complain on every start when this is unset, though compute needs none.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // SAFETY: single-threaded here, before anything reads the environment.
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir()) };
    }
    caml_wgpu::cli::install_panic_hook();
    let cli = caml_wgpu::cli::Cli::parse();
    match std::panic::catch_unwind(|| caml_wgpu::cli::run(cli)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        // The hook has printed the message.
        Err(_) => std::process::exit(101),
    }
}
