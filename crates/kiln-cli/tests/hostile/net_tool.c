/* A hostile workload's network tool, run as root inside a sandbox by
 * e2e_network_policy.rs (built there with `cc -static`). Busybox's nc has
 * no UDP and no source address, so this sends what the tests need:
 *
 *   net_tool udp DSTIP PORT [COUNT]
 *       COUNT (default 1, at most 100000) UDP datagrams through the kernel
 *       (an ordinary socket), as fast as it can send them.
 *   net_tool frame IFACE SRCMAC SRCIP DSTMAC DSTIP PORT
 *       one hand-made Ethernet/IPv4/UDP frame through an AF_PACKET socket:
 *       the guest's kernel adds nothing, so the source MAC and IP are
 *       whatever the arguments say (spoofed or genuine).
 *   net_tool frame6 IFACE SRCMAC DSTMAC
 *       one hand-made Ethernet/IPv6/UDP frame (fd00:88::5 -> fd00:88::2,
 *       port 7600) through an AF_PACKET socket.
 * Exit status 0 when the frame or datagram was handed to the kernel.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int parse_mac(const char *s, uint8_t mac[6]) {
    unsigned v[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6) return -1;
    for (int i = 0; i < 6; i++) {
        if (v[i] > 255) return -1;
        mac[i] = (uint8_t)v[i];
    }
    return 0;
}

static uint16_t csum(const void *data, size_t len) {
    const uint8_t *p = data;
    uint32_t sum = 0;
    for (size_t i = 0; i + 1 < len; i += 2) sum += (uint32_t)(p[i] << 8 | p[i + 1]);
    if (len & 1) sum += (uint32_t)(p[len - 1] << 8);
    while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static int send_frame(const char *ifname, const uint8_t *frame, size_t len) {
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0) { perror("socket(AF_PACKET)"); return 1; }
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = (int)if_nametoindex(ifname);
    sll.sll_halen = 6;
    memcpy(sll.sll_addr, frame, 6);
    if (sll.sll_ifindex == 0) { perror("if_nametoindex"); return 1; }
    if (sendto(fd, frame, len, 0, (struct sockaddr *)&sll, sizeof sll) != (ssize_t)len) {
        perror("sendto");
        return 1;
    }
    close(fd);
    return 0;
}

static int frame4(char **a) {
    uint8_t f[64];
    memset(f, 0, sizeof f);
    uint8_t src[6], dst[6];
    struct in_addr sip, dip;
    int port = atoi(a[5]);
    if (parse_mac(a[1], src) || parse_mac(a[3], dst) || !inet_aton(a[2], &sip) ||
        !inet_aton(a[4], &dip) || port <= 0 || port > 65535) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = 0x08; f[13] = 0x00;
    uint8_t *ip = f + 14;
    const char payload[] = "spoof";
    size_t udp_len = 8 + sizeof payload - 1;
    ip[0] = 0x45;
    ip[2] = (uint8_t)((20 + udp_len) >> 8); ip[3] = (uint8_t)(20 + udp_len);
    ip[8] = 64; ip[9] = 17;
    memcpy(ip + 12, &sip, 4);
    memcpy(ip + 16, &dip, 4);
    uint16_t c = csum(ip, 20);
    ip[10] = (uint8_t)(c >> 8); ip[11] = (uint8_t)c;
    uint8_t *udp = ip + 20;
    udp[0] = 0x9c; udp[1] = 0x40; /* source port 40000 */
    udp[2] = (uint8_t)(port >> 8); udp[3] = (uint8_t)port;
    udp[4] = 0; udp[5] = (uint8_t)udp_len;
    memcpy(udp + 8, payload, sizeof payload - 1); /* UDP checksum 0: none */
    return send_frame(a[0], f, 14 + 20 + udp_len);
}

static int frame6(char **a) {
    uint8_t f[14 + 40 + 8 + 4];
    memset(f, 0, sizeof f);
    uint8_t src[6], dst[6];
    if (parse_mac(a[1], src) || parse_mac(a[2], dst)) { fprintf(stderr, "bad MAC\n"); return 2; }
    memcpy(f, dst, 6);
    memcpy(f + 6, src, 6);
    f[12] = 0x86; f[13] = 0xdd;
    uint8_t *ip6 = f + 14;
    ip6[0] = 0x60;
    ip6[5] = 12; /* payload length: UDP header + 4 bytes */
    ip6[6] = 17; ip6[7] = 64;
    inet_pton(AF_INET6, "fd00:88::5", ip6 + 8);
    inet_pton(AF_INET6, "fd00:88::2", ip6 + 24);
    uint8_t *udp = ip6 + 40;
    udp[0] = 0x9c; udp[1] = 0x40;
    udp[2] = 0x1d; udp[3] = 0xb0; /* 7600 */
    udp[5] = 12;
    memcpy(udp + 8, "six!", 4);
    /* The checksum is left wrong: the receiver counts frames before any
     * UDP check, and a bypass is a bypass whatever the checksum. */
    return send_frame(a[0], f, sizeof f);
}

static int udp(char **a, int count) {
    struct sockaddr_in to;
    memset(&to, 0, sizeof to);
    to.sin_family = AF_INET;
    int port = atoi(a[1]);
    if (!inet_aton(a[0], &to.sin_addr) || port <= 0 || port > 65535) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    to.sin_port = htons((uint16_t)port);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) { perror("socket"); return 1; }
    for (int i = 0; i < count; i++)
        if (sendto(fd, "udp", 3, 0, (struct sockaddr *)&to, sizeof to) != 3) { perror("sendto"); return 1; }
    close(fd);
    return 0;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "udp") == 0) return udp(argv + 2, 1);
    if (argc == 5 && strcmp(argv[1], "udp") == 0) {
        int n = atoi(argv[4]);
        if (n < 1 || n > 100000) { fprintf(stderr, "bad COUNT\n"); return 2; }
        return udp(argv + 2, n);
    }
    if (argc == 8 && strcmp(argv[1], "frame") == 0) return frame4(argv + 2);
    if (argc == 5 && strcmp(argv[1], "frame6") == 0) return frame6(argv + 2);
    fprintf(stderr, "usage: net_tool udp DSTIP PORT [COUNT] | frame IFACE SRCMAC SRCIP DSTMAC DSTIP PORT | frame6 IFACE SRCMAC DSTMAC\n");
    return 2;
}
