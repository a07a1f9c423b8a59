/* A hostile workload's tools, run as root inside a sandbox by
 * e2e_hardening.rs (built there with `cc -static`).
 *
 *   guest_tool forge FILE     writes FILE's bytes onto the guest agent's
 *                             channel, through a copy of kiln-init's own
 *                             descriptor (pidfd_getfd on PID 1).
 *   guest_tool cmdline FILE PAD...
 *                             overwrites its own argument area with FILE's
 *                             bytes (NULs included), so /proc/PID/cmdline,
 *                             which stat calls empty, holds them; sleeps.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

static int read_file(const char *path, char *buf, size_t cap, size_t *len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0) { close(fd); return -1; }
        if (r == 0) break;
        n += (size_t)r;
        if (n == cap) break;
    }
    close(fd);
    *len = n;
    return 0;
}

static int forge(const char *path) {
    static char buf[1 << 20];
    size_t len;
    if (read_file(path, buf, sizeof buf, &len) != 0) { perror("read"); return 1; }
    DIR *d = opendir("/proc/1/fd");
    if (!d) { perror("opendir"); return 1; }
    int target = -1;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        char link[64], dest[256];
        snprintf(link, sizeof link, "/proc/1/fd/%s", e->d_name);
        ssize_t n = readlink(link, dest, sizeof dest - 1);
        if (n <= 0) continue;
        dest[n] = 0;
        if (strncmp(dest, "/dev/vport", 10) == 0) { target = atoi(e->d_name); break; }
    }
    closedir(d);
    if (target < 0) { fprintf(stderr, "no agent port among PID 1's descriptors\n"); return 1; }
    int pidfd = (int)syscall(SYS_pidfd_open, 1, 0);
    if (pidfd < 0) { perror("pidfd_open"); return 1; }
    int fd = (int)syscall(SYS_pidfd_getfd, pidfd, target, 0);
    if (fd < 0) { perror("pidfd_getfd"); return 1; }
    /* kiln-init's descriptor is non-blocking: retry until all is written. */
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(fd, buf + off, len - off);
        if (w > 0) off += (size_t)w; else usleep(1000);
    }
    printf("forged %zu bytes\n", len);
    return 0;
}

static int cmdline(int argc, char **argv) {
    char buf[4096];
    size_t len;
    if (read_file(argv[2], buf, sizeof buf, &len) != 0) { perror("read"); return 1; }
    char *start = argv[0];
    char *end = argv[argc - 1] + strlen(argv[argc - 1]); /* the final NUL stays */
    if ((size_t)(end - start) <= len) { fprintf(stderr, "argument area too small\n"); return 1; }
    memcpy(start, buf, len);
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}

int main(int argc, char **argv) {
    if (argc >= 3 && strcmp(argv[1], "forge") == 0) return forge(argv[2]);
    if (argc >= 4 && strcmp(argv[1], "cmdline") == 0) return cmdline(argc, argv);
    fprintf(stderr, "usage: guest_tool forge FILE | cmdline FILE PAD...\n");
    return 2;
}
